"""Samplers shared by the teacher, the students, training previews and evaluation.

A sampler only needs an ε-predictor `eps_fn(x_t, t) -> ε̂` and a diffusers scheduler; the scheduler
decides the algorithm (DPM-Solver++ for the teacher, one DDPM step for DMD, LCMScheduler for LCM).
The loop mirrors `diffusers.PixArtSigmaPipeline.__call__` so that our images equal the pipeline's.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .images import to_uint8

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_images(model, prompts: list[str], seeds: list[int], steps: int | None = None,
                    guidance_scale: float | None = None, timesteps: list[int] | None = None, batch_size: int = 8,
                    desc: str = "generating", progress: bool = True,
                    batch_seconds: list | None = None) -> tuple[np.ndarray, float]:
    """Images (N, H, W, 3) uint8 for `prompts`, image i from noise seeded by `seeds[i]` (so the batch size
    never changes an image), and the seconds spent prompt → image (model loading excluded); each batch's
    seconds are appended to `batch_seconds` if given (the first one includes compilation)."""
    images, seconds = [], 0.0
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator(model.device).manual_seed(s) for s in seeds[start:start + batch_size]]
        noise = initial_noise(model.latent_shape(len(chunk)), generators, model.device, model.dtype)
        _sync(model.device)
        began = time.perf_counter()
        embeds, mask = model.encode_prompts(chunk)
        # The same generators keep going inside stochastic samplers (LCM re-noises between steps).
        latents = model.sample(embeds=embeds, mask=mask, noise=noise, num_inference_steps=steps,
                               guidance_scale=guidance_scale, timesteps=timesteps, generator=generators)
        batch = to_uint8(model.decode(latents))
        _sync(model.device)
        elapsed = time.perf_counter() - began
        seconds += elapsed
        if batch_seconds is not None:
            batch_seconds.append(elapsed)
        images.extend(batch)
    return np.stack(images), seconds
