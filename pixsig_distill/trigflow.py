"""PixArt-Σ's DDPM schedule seen as TrigFlow (Lu & Song 2024, sCM §3), with σ_d = 1.

TrigFlow writes a noisy sample as x_t̂ = cos t̂ · x0 + sin t̂ · z with t̂ ∈ [0, π/2]. PixArt-Σ's variance-preserving
schedule is the same family: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, so t̂ = arccos √ᾱ_t and x_t is unchanged (no rescaling,
because σ_d = 1 and the VP schedule keeps unit variance). Its last training step t = 999 is t̂ ≈ 1.5644, not π/2.

The network still takes PixArt's DDPM timestep in its sinusoidal embedding (0…999). A continuous t̂ therefore needs a
continuous DDPM timestep t(t̂): here the piecewise-linear inverse of the table t̂_k = arccos √ᾱ_k, exact at every
integer k, so a student queried by a stock diffusers scheduler at integer timesteps sees the ᾱ it was trained on.
Its slope dt/dt̂ (207 at t = 0, 504 at t = 400, 15,500 at t = 998) is the chain-rule factor by which a tangent in
t̂ enters the time embedding: `jvp.py` and docs/consistency.md.

All functions are differentiable in t̂ (forward and reverse mode) and take ᾱ from the teacher's scheduler.
"""

from __future__ import annotations

import torch


def trigflow_grid(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """t̂_k = arccos √ᾱ_k for every training timestep k = 0 … T−1 (float64, increasing)."""
    return torch.arccos(alphas_cumprod.to(torch.float64).clamp(0.0, 1.0).sqrt())


def trigflow_time(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """t̂ of integer DDPM timesteps t (float64): T̄ = 400 → 1.1152, t = 999 → 1.5644."""
    grid = trigflow_grid(alphas_cumprod).to(t.device)
    return grid[t.long()]


def _segment(t_hat: torch.Tensor, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The table segment that holds t̂: its left knot index k, t̂_k and the slope 1/(t̂_{k+1} − t̂_k) (float64),
    the end segments for t̂ beyond the table. Only indices and constants: no derivative flows through them."""
    grid = trigflow_grid(alphas_cumprod).to(t_hat.device)
    k = (torch.searchsorted(grid, t_hat.detach().to(torch.float64)) - 1).clamp(0, len(grid) - 2)
    return k, grid[k], 1.0 / (grid[k + 1] - grid[k])


def ddpm_timestep(t_hat: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The continuous DDPM timestep t(t̂) that PixArt's time embedding takes, in t̂'s dtype.

    Piecewise linear between the table's knots (exact at integers); beyond the table (t̂ < t̂_0 ≈ 0.0100 or
    t̂ > t̂_999 ≈ 1.5644) it continues the end segments' slopes, outside what the teacher was trained on: methods
    should draw t̂ within [t̂_0, t̂_{T−1}]."""
    k, left, slope = _segment(t_hat, alphas_cumprod)
    # The slope is taken in float64: near t = 999 the knots are 6e-5 apart, below float32's resolution of t̂'s gaps.
    return k.to(t_hat.dtype) + (t_hat - left.to(t_hat.dtype)) * slope.to(t_hat.dtype)


def timestep_rate(t_hat: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """dt/dt̂ at t̂: how many DDPM timesteps one unit of TrigFlow time is worth there (the chain-rule factor)."""
    return _segment(t_hat, alphas_cumprod)[2].to(t_hat.dtype)


def _per_sample(t_hat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t_hat.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def velocity_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """TrigFlow's F (= diffusers' v-prediction) from ε̂: F = cos t̂·ε̂ − sin t̂·x̂0 = (ε̂ − sin t̂·x_t) / cos t̂.

    The division by cos t̂ amplifies ε̂'s errors: 157× at t = 999 (cos t̂ = 0.0064)."""
    t_hat = _per_sample(t_hat, x_t)
    return (eps - torch.sin(t_hat) * x_t) / torch.cos(t_hat)


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """The consistency function with σ_d = 1 (sCM §3): f(x_t, t̂) = cos t̂·x_t − sin t̂·F; f(x, 0) = x."""
    t_hat = _per_sample(t_hat, x_t)
    return torch.cos(t_hat) * x_t - torch.sin(t_hat) * velocity


def eps_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """ε̂ = sin t̂·x_t + cos t̂·F, the inverse of `velocity_from_eps`."""
    t_hat = _per_sample(t_hat, x_t)
    return torch.sin(t_hat) * x_t + torch.cos(t_hat) * velocity
