"""pixsig-distill: fast students for PixArt-Σ (one-step DMD, few-step LCM) and an honest leaderboard."""

from . import config as _config  # noqa: F401  (registers the ${toy_asset:...} resolver for every entry point)

__version__ = "0.1.0"
