"""`python -m pixsig_distill.generate`: images from the teacher or a student, with their latency.

Writes `images/00000.png ...`, `grid.png` and `latency.json` under out_dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from PIL import Image
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .config import build, check_float, check_int, one_line_config_errors
from .data import check_prompts, read_prompt_file
from .errors import UserError, exit_on_user_error
from .images import save_grid, to_uint8
from .sampling import initial_noise
from .students import load_student, teacher_spec
from .threads import configure_threads


def _prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt is not None and cfg.prompt_file is not None:
        raise UserError("give prompt= or prompt_file=, not both")
    if cfg.prompt_file is not None:
        return read_prompt_file(cfg.prompt_file)
    if cfg.prompt is None:
        raise UserError('no prompt; pass prompt="..." or prompt_file=path/to/prompts.txt')
    return check_prompts([str(cfg.prompt)])


def load_model(cfg: DictConfig):
    """The teacher, or the student at cfg.student, with its default sampler settings."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.student is not None:
        return load_student(cfg.student, model_cfg, device=cfg.device, dtype=cfg.dtype)
    overrides = {"torch_dtype": cfg.dtype} if cfg.dtype else {}
    teacher = build(cfg.model, **overrides)
    return teacher, teacher_spec(teacher)


def generate_images(model, prompts: list[str], seeds: list[int], steps: int | None = None,
                    guidance_scale: float | None = None, timesteps: list[int] | None = None, batch_size: int = 8,
                    desc: str = "generating", progress: bool = True) -> tuple[np.ndarray, float]:
    """Images (N, H, W, 3) uint8 for `prompts`, image i from noise seeded by `seeds[i]` (so the batch size
    never changes an image), and the seconds spent prompt → image (model loading excluded)."""
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
        seconds += time.perf_counter() - began
        images.extend(batch)
    return np.stack(images), seconds


def generate(cfg: DictConfig) -> dict:
    prompts = _prompts(cfg)
    n_images = check_int(cfg, "n_images", 1)
    batch_size = check_int(cfg, "batch_size", 1)
    check_int(cfg, "seed", 0)
    if cfg.steps is not None:
        check_int(cfg, "steps", 1, hint="use a positive number of sampling steps")
    if cfg.guidance_scale is not None:
        check_float(cfg, "guidance_scale", 0.0, hint="use a number >= 0 (1 = no guidance; the teacher's is 4.5)")
    model, spec = load_model(cfg)
    steps = cfg.steps or spec.num_inference_steps
    timesteps = spec.timesteps
    if spec.method == "dmd" and steps != 1:
        raise UserError(f"steps={steps}: a DMD student samples in one step from T̄={spec.timesteps[0]}; use steps=1")
    original = spec.card.get("original_inference_steps")
    if original is not None and steps > original:
        raise UserError(f"steps={steps}: this {spec.method} student was trained on a {original}-step grid; "
                        f"use steps <= {original} (it is made for 1 to 8)")
    guidance = spec.guidance_scale if cfg.guidance_scale is None else float(cfg.guidance_scale)

    jobs = [p for p in prompts for _ in range(n_images)]
    out = Path(cfg.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, seconds = generate_images(model, jobs, [cfg.seed + i for i in range(len(jobs))], steps, guidance,
                                      timesteps, batch_size, desc=f"generating ({spec.method}, {steps} steps)")
    for i, image in enumerate(images):
        Image.fromarray(image).save(out / "images" / f"{i:05d}.png")
    save_grid(images, out / "grid.png", columns=n_images if n_images > 1 else 8,
              scale=max(1, 128 // images[0].shape[0]))
    report = {"method": spec.method, "steps": steps, "guidance_scale": guidance, "images": len(images),
              "batch_size": min(batch_size, len(images)), "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
              "seconds": seconds, "ms_per_image": 1000 * seconds / len(images),
              "note": "end-to-end (T5 + transformer + VAE), excluding model loading, first batch included"}
    (out / "latency.json").write_text(json.dumps(report, indent=1))
    print(f"{len(images)} images from {spec.method} ({steps} steps) in {seconds:.2f} s: "
          f"{report['ms_per_image']:.1f} ms/image at batch {report['batch_size']} on {report['device']} → {out}")
    return report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@one_line_config_errors("generate")
@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    configure_threads()
    generate(cfg)


if __name__ == "__main__":
    main()
