"""Score samplers on the toy world's held-out captions with the toy evaluators.

Used at the end of a toy training run (figures into the run folder) and by the reports in docs/.
Every figure says what it is: FID is clean-fid's Fréchet distance on toy-CLIP image features
(`features.FID_DESCRIPTION`), CLIP score the mean plain cosine between toy-CLIP image and caption embeddings,
caption accuracy the toy CLIP's top-1 pick among 10 held-out captions.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..generate import generate_images
from .clip import caption_accuracy, clip_image_features, clip_text_features, heldout_images, load_toy_clip
from .features import FID_DESCRIPTION, toy_fid

FID_LABEL = FID_DESCRIPTION
CLIP_LABEL = "toy-CLIP plain cosine (image, caption)"


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def clip_score(clip, tokenizer, images: np.ndarray, captions: list[str], batch_size: int = 500) -> float:
    """Mean cosine similarity of each image with its own caption (plain cosine, as the seed table)."""
    scores = []
    for i in range(0, len(images), batch_size):
        image = clip_image_features(clip, _unit(images[i:i + batch_size]))
        text = clip_text_features(clip, tokenizer, captions[i:i + batch_size])
        scores.append((image * text).sum(-1))
    return float(torch.cat(scores).mean())


class ToyEvaluator:
    """Held-out prompts, fixed seeds, real reference images and the toy CLIP, loaded once."""

    def __init__(self, n: int = 1000, seed: int = 1):
        self.real, self.captions = heldout_images(n, seed=seed)
        self.real_uint8 = (self.real.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        self.seeds = list(range(n))
        self.clip, _, self.tokenizer = load_toy_clip()

    def score_images(self, images: np.ndarray) -> dict:
        return {"fid": toy_fid(self.real_uint8, images),
                "clip_score": clip_score(self.clip, self.tokenizer, images, self.captions),
                "caption_accuracy": caption_accuracy(self.clip, self.tokenizer, _unit(images), self.captions),
                "n_samples": len(images)}

    def score_sampler(self, model, steps: int | None, guidance_scale: float | None, timesteps=None,
                      batch_size: int = 250, name: str = "") -> tuple[dict, np.ndarray]:
        images, seconds = generate_images(model, self.captions, self.seeds, steps, guidance_scale, timesteps,
                                          batch_size, desc=f"eval {name}".strip())
        return {**self.score_images(images), "ms_per_image": 1000 * seconds / len(images),
                "batch_size": batch_size}, images


def teacher_reference(evaluator: ToyEvaluator, teacher, teacher_path: str, cache_dir: str | Path | None = None,
                      steps: int = 20, guidance_scale: float = 4.5) -> dict:
    """The teacher's own figures, cached by (weights, n, steps, guidance): computed once per machine."""
    weights = Path(teacher_path) / "transformer" / "diffusion_pytorch_model.safetensors"
    key = hashlib.sha256(weights.read_bytes() + f"{len(evaluator.captions)}-{steps}-{guidance_scale}".encode())
    cache = Path(cache_dir or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pixsig-distill" / "toy-eval"
    path = cache / f"teacher-{key.hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    figures, _ = evaluator.score_sampler(teacher, steps, guidance_scale, name=f"teacher {steps} steps")
    figures.update(steps=steps, guidance_scale=guidance_scale)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures, indent=1))
    tmp.replace(path)
    return figures


def evaluate_export(export: str | Path, teacher, teacher_path: str, out_dir: str | Path, n_samples: int = 1000,
                    batch_size: int = 250, steps: list[int] | None = None) -> dict:
    """Score an exported student against the teacher's 20-step sampler; write eval.json + eval_grid.png."""
    from ..images import save_grid
    from ..students import load_student

    out_dir = Path(out_dir)
    evaluator = ToyEvaluator(n_samples)
    reference = teacher_reference(evaluator, teacher, teacher_path)
    student, spec = load_student(export, {"max_sequence_length": teacher.max_sequence_length,
                                          "resolution": teacher.resolution}, device=str(teacher.device))
    rows, report = [], {"teacher_20": reference, "fid_label": FID_LABEL, "clip_label": CLIP_LABEL}
    if steps is None:  # few-step students are reported at 1, 2 and 4 steps, as in the seed's table
        steps = [1, 2, 4] if spec.method.startswith("lcm") else [spec.num_inference_steps]
    for n_steps in steps:
        figures, images = evaluator.score_sampler(student, n_steps, spec.guidance_scale, spec.timesteps, batch_size,
                                                  name=f"{spec.method} {n_steps} step(s)")
        figures["fid_ratio_to_teacher"] = figures["fid"] / reference["fid"]
        figures["clip_ratio_to_teacher"] = figures["clip_score"] / reference["clip_score"]
        report[f"{spec.method}_{n_steps}"] = figures
        rows.append(images[:8])
    if max(steps) > 1:  # the teacher's own sampler at the student's largest step count, the bar to beat
        report[f"teacher_{max(steps)}"] = teacher_reference(evaluator, teacher, teacher_path, steps=max(steps))
    teacher_images, _ = generate_images(teacher, evaluator.captions[:8], evaluator.seeds[:8], 20, 4.5,
                                        progress=False)
    save_grid(np.concatenate([evaluator.real_uint8[:8], teacher_images] + rows), out_dir / "eval_grid.png",
              columns=8, scale=4)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1))
    return report
