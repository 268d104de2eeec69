"""pixsig-distill: fast students for PixArt-Σ (one-step DMD, few-step LCM) and an honest leaderboard."""

__version__ = "0.1.0"
