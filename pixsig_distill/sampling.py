"""Samplers shared by the teacher, the students, training previews and evaluation.

A sampler only needs an ε-predictor `eps_fn(x_t, t) -> ε̂` and a diffusers scheduler; the scheduler
decides the algorithm (DPM-Solver++ for the teacher, one DDPM step for DMD, LCMScheduler for LCM).
The loop mirrors `diffusers.PixArtSigmaPipeline.__call__` so that our images equal the pipeline's.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fresh_scheduler(scheduler):
    """A private copy: multistep schedulers keep state between steps, so never share one."""
    return type(scheduler).from_config(scheduler.config)


def initial_noise(shape: Sequence[int], generator: torch.Generator | list | None, device, dtype) -> torch.Tensor:
    """Unit Gaussian noise drawn exactly as the diffusers pipelines draw it."""
    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


@torch.no_grad()
def sample_latents(eps_fn: EpsFn, scheduler, noise: torch.Tensor, num_inference_steps: int | None = None,
                   timesteps: Sequence[int] | None = None, generator=None, progress: bool = False) -> torch.Tensor:
    """Run `scheduler` from `noise` to clean latents with the ε-predictor `eps_fn`.

    Pass either `num_inference_steps` or explicit `timesteps` (e.g. `[400]` for a DMD student).
    """
    scheduler = fresh_scheduler(scheduler)
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), device=noise.device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}

    latents = noise * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
        model_input = scheduler.scale_model_input(latents, t)
        t_batch = t.reshape(1).to(noise.device).expand(latents.shape[0])
        eps = eps_fn(model_input, t_batch)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
    return latents
