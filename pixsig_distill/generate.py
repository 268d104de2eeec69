"""`python -m pixsig_distill.generate`: images from the teacher or a student, with their latency.

Writes `images/00000.png ...`, `grid.png` and `latency.json` under out_dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from PIL import Image
from omegaconf import DictConfig, OmegaConf

from .config import build, check_float, check_int, one_line_config_errors
from .data import check_prompts, read_prompt_file
from .errors import UserError, exit_on_user_error
from .images import save_grid
from .sampling import generate_images
from .students import load_student, teacher_spec
from .console import start_process


def _prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt is not None and cfg.prompts is not None:
        raise UserError("give prompt= or prompts=, not both")
    if cfg.prompts is not None:
        return read_prompt_file(cfg.prompts)
    if cfg.prompt is None:
        raise UserError('no prompt; pass prompt="..." or prompts=path/to/prompts.txt')
    return check_prompts([str(cfg.prompt)])


def load_model(cfg: DictConfig):
    """The teacher, or the student at cfg.student, with its default sampler settings."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.student is not None:
        return load_student(cfg.student, model_cfg, device=cfg.device, dtype=cfg.dtype)
    overrides = {"torch_dtype": cfg.dtype} if cfg.dtype else {}
    teacher = build(cfg.model, **overrides)
    return teacher, teacher_spec(teacher)


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
    spec.check_steps(steps)
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


@one_line_config_errors("generate")
@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    start_process()
    generate(cfg)


if __name__ == "__main__":
    main()
