"""`python -m pixsig_distill.generate`: images from the teacher or a student, with their latency.

Writes `images/00000.png ...`, `grid.png` and `latency.json` under out_dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image
from omegaconf import DictConfig

from .config import check_float, check_int
from .data import check_prompts, read_prompt_file
from .errors import UserError
from .images import save_grid
from .sampling import generate_images
from .inference import InferenceMode, load_for_inference
from .console import entry_point


def _prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt is not None and cfg.prompts is not None:
        raise UserError("give prompt= or prompts=, not both")
    if cfg.prompts is not None:
        return read_prompt_file(cfg.prompts)
    if cfg.prompt is None:
        raise UserError('no prompt; pass prompt="..." or prompts=path/to/prompts.txt')
    return check_prompts([str(cfg.prompt)])


def validate(cfg: DictConfig) -> None:
    check_int(cfg, "n_images", 1)
    check_int(cfg, "batch_size", 1)
    check_int(cfg, "seed", 0)
    if cfg.steps is not None:
        check_int(cfg, "steps", 1, hint="use a positive number of sampling steps")
    if cfg.guidance_scale is not None:
        check_float(cfg, "guidance_scale", 0.0, hint="use a number >= 0 (1 = no guidance; the teacher's is 4.5)")


def generate(cfg: DictConfig) -> dict:
    prompts = _prompts(cfg)
    validate(cfg)
    n_images, batch_size = int(cfg.n_images), int(cfg.batch_size)
    jobs = [p for p in prompts for _ in range(n_images)]
    mode = InferenceMode.from_config(cfg)
    began = time.perf_counter()
    model, spec = load_for_inference(cfg.model, cfg.student, cfg.device, mode, prompts=jobs)
    load_s = time.perf_counter() - began
    steps = cfg.steps or spec.num_inference_steps
    timesteps = spec.timesteps
    spec.check_steps(steps)
    guidance = spec.guidance_scale if cfg.guidance_scale is None else float(cfg.guidance_scale)

    out = Path(cfg.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    batch_seconds: list[float] = []
    images, seconds = generate_images(model, jobs, [cfg.seed + i for i in range(len(jobs))], steps, guidance,
                                      timesteps, batch_size, desc=f"generating ({spec.method}, {steps} steps)",
                                      batch_seconds=batch_seconds)
    for i, image in enumerate(images):
        Image.fromarray(image).save(out / "images" / f"{i:05d}.png")
    save_grid(images, out / "grid.png", columns=n_images if n_images > 1 else 8,
              scale=max(1, 128 // images[0].shape[0]))
    shown = min(batch_size, len(images))
    steady = batch_seconds[1:]  # the first batch also pays for compilation and warm-up
    steady_ms = 1000 * sum(steady) / (len(images) - shown) if steady else None
    report = {"method": spec.method, "steps": steps, "guidance_scale": guidance, "images": len(images),
              "batch_size": shown, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
              "mode": mode.describe(model), "compile": mode.compile, "offload": mode.offload,
              "text_encoder_quantization": mode.quantization, "text_encoder_released": mode.release_text_encoder,
              "seconds": seconds, "ms_per_image": 1000 * seconds / len(images),
              "first_batch_s": batch_seconds[0], "steady_ms_per_image": steady_ms, "load_s": load_s,
              "note": "prompt → image per batch (T5 + transformer + VAE; with text_encoder.release every prompt was "
                      "encoded while loading, in load_s), loading excluded; steady state = every batch after the first"}
    (out / "latency.json").write_text(json.dumps(report, indent=1))
    steady_text = (f"steady {steady_ms:.1f} ms/image after a first batch of {batch_seconds[0]:.2f} s"
                   if steady_ms is not None else f"one batch of {batch_seconds[0]:.2f} s (first call included; "
                   f"more images than batch_size= give a steady-state figure)")
    encoded = f"; T5 loaded alone, every prompt encoded, T5 freed: load {load_s:.2f} s" if mode.release_text_encoder else ""
    print(f"{len(images)} images from {spec.method} ({steps} steps) at batch {shown} on {report['device']} "
          f"[{report['mode']}]: {steady_text}{encoded} → {out}")
    return report


main = entry_point("generate", generate, validate=validate)


if __name__ == "__main__":
    main()
