"""Latency as the evaluation conventions ask: batch 1, warm-up, device sync, median of many runs.

Two measurements per model and step count:

* `end_to_end` — prompt → image: T5 encoding, the transformer steps (with CFG where the sampler
  uses it) and the VAE decode; the initial noise is drawn before the clock starts. The same runs
  also time each of the three stages (`stages`: text_encoder, transformer, vae), each between two
  device synchronisations, so a breakdown always adds up to the figure it explains.
* `transformer` — the denoising loop alone on precomputed prompt embeddings, no T5, no decode.

Every run is bracketed by a device synchronisation (CUDA kernels are asynchronous, so without it
the clock would stop before the work is done). Statistics: median and 90th percentile of the
timed runs (numpy's percentile, linear interpolation), in milliseconds.
"""

from __future__ import annotations

import time
from importlib import metadata

import numpy as np
import torch

from pixsig_distill.distributed import device_name  # noqa: F401  (re-exported: reports name the device)
from pixsig_distill.sampling import initial_noise

MODES = ("end_to_end", "transformer")


def summarize(seconds: list[float]) -> dict:
    """Median, p90, mean, min and max in ms of per-run times given in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {"median": float(np.percentile(ms, 50, method="linear")),
            "p90": float(np.percentile(ms, 90, method="linear")),
            "mean": float(ms.mean()), "min": float(ms.min()), "max": float(ms.max()), "runs": int(ms.size)}


def time_runs(fn, warmup: int = 3, runs: int = 20, sync=lambda: None, clock=time.perf_counter) -> list[float]:
    """Call `fn` `warmup` times untimed, then `runs` times, each timed between two `sync()` calls."""
    return [total for total, _ in time_stages(lambda lap: fn(), warmup, runs, sync, clock)]


def time_stages(fn, warmup: int = 3, runs: int = 20, sync=lambda: None, clock=time.perf_counter):
    """Like `time_runs`, for an `fn(lap)` that calls `lap(name)` at the end of each of its stages: per run, (total
    seconds, {stage: seconds}); `lap` synchronises the device, so each stage is charged its own work."""
    def untimed(name):
        pass

    for _ in range(warmup):
        fn(untimed)
    sync()
    out = []
    for _ in range(runs):
        stages = {}
        sync()
        began = last = clock()

        def lap(name):
            nonlocal last
            sync()
            now = clock()
            stages[name] = now - last
            last = now

        fn(lap)
        sync()
        out.append((clock() - began, stages))
    return out


def device_sync(device: torch.device):
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def versions() -> dict:
    out = {}
    for package in ("torch", "diffusers", "transformers", "accelerate", "open_clip_torch", "clean-fid", "torchmetrics"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def measure_latency(model, prompt: str, steps: int | None = None, guidance_scale: float | None = None,
                    timesteps: list[int] | None = None, mode: str = "end_to_end", batch_size: int = 1,
                    warmup: int = 3, runs: int = 20, seed: int = 0) -> dict:
    """Time one sampler configuration of a `Teacher`-shaped model; returns a self-describing record."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    prompts = [prompt] * batch_size

    def generators():  # fresh each run: stochastic samplers (LCM) draw from them between steps
        return [torch.Generator(model.device).manual_seed(seed + i) for i in range(batch_size)]

    noise = initial_noise(model.latent_shape(batch_size), generators(), model.device, model.dtype)
    if mode == "end_to_end":
        def fn(lap):
            embeds, mask = model.encode_prompts(prompts)
            lap("text_encoder")
            latents = model.sample(embeds=embeds, mask=mask, noise=noise, num_inference_steps=steps,
                                   guidance_scale=guidance_scale, timesteps=timesteps, generator=generators())
            lap("transformer")
            images = model.decode(latents)
            lap("vae")
            return images
    else:
        embeds, mask = model.encode_prompts(prompts)

        def fn(lap):
            return model.sample(embeds=embeds, mask=mask, noise=noise, num_inference_steps=steps,
                                guidance_scale=guidance_scale, timesteps=timesteps, generator=generators())

    timed = time_stages(fn, warmup, runs, device_sync(model.device))
    stages = {name: summarize([s[name] for _, s in timed]) for name in (timed[0][1] if timed else {})}
    return {"mode": mode, **summarize([total for total, _ in timed]), "stages": stages, "warmup": warmup,
            "batch_size": batch_size, "steps": steps, "device": device_name(model.device),
            "dtype": str(model.dtype).replace("torch.", ""), "resolution": model.resolution,
            "decoder": type(model.vae).__name__, "versions": versions()}
