"""Pure functions over the DDPM noise schedule that PixArt-Σ is trained with.

Notation (DDPM, Ho et al. 2020): x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε, with ᾱ_t the cumulative product
of (1 − β) over PixArt's linear β schedule (1e-4 … 0.02, 1000 steps). Every function takes ᾱ as a
tensor so that the schedule itself comes from the teacher's diffusers scheduler, never re-typed here.
"""

from __future__ import annotations

import inspect

import torch


# PixArt-Σ's scheduler as shipped on the hub: DPM-Solver++ over DDPM linear β 1e-4..0.02.
PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                        lower_order_final=True, use_karras_sigmas=False)


def _at(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t gathered per sample and shaped to broadcast against `like` (B, C, H, W)."""
    a = alphas_cumprod.to(like.device)[t.to(like.device).long()]
    return a.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0): x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε  (DDPM eq. 4)."""
    a = _at(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Invert the forward process for x0: x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t  (DDPM eq. 15)."""
    a = _at(alphas_cumprod, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_t − √ᾱ_t x̂0) / √(1−ᾱ_t), the inverse of `x0_from_eps`."""
    a = _at(alphas_cumprod, t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM step x_t → x_{t_prev} (Song et al. 2021, eq. 12 with σ = 0).

    t_prev < 0 means "the end of the chain", where ᾱ = 1 and the step returns x̂0.
    """
    x0 = x0_from_eps(x_t, eps, t, alphas_cumprod)
    a_prev = torch.where(t_prev >= 0, alphas_cumprod.to(x_t.device)[t_prev.clamp(min=0).long()],
                         torch.ones((), device=x_t.device, dtype=alphas_cumprod.dtype))
    a_prev = a_prev.to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per timestep."""
    a = alphas_cumprod.to(t.device)[t.long()]
    return a / (1 - a)


# ---- latent consistency models (Luo et al. 2023) ------------------------------------------------

def skipping_step_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The skipping-step solver's grid {k−1, 2k−1, …} with k = T // N (LCM §4.3): {19, 39, …, 999} for
    T = 1000, N = 50. It is also LCMScheduler's "original" schedule, so training and sampling agree."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def lcm_boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency-model boundary scalings on discrete timesteps (Song et al. 2023, consistency models; LCM §4.1):
    c_skip(t) = σ²/((s·t)² + σ²), c_out(t) = s·t / √((s·t)² + σ²), so f(x, 0) = x exactly."""
    scaled = t.to(torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def scheduler_like(scheduler_cls, config, **overrides):
    """`scheduler_cls` over the teacher's noise schedule. Settings it does not take (the teacher's
    DPM-Solver ones) are dropped, so the exported scheduler_config.json loads without warnings."""
    accepted = set(inspect.signature(scheduler_cls.__init__).parameters) - {"self"}
    return scheduler_cls.from_config({k: v for k, v in dict(config).items() if k in accepted}, **overrides)
