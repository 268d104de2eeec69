"""Measure the toy world and its teacher; write the figures and a sample grid to docs/.

    python scripts/toy_quality.py                # 2,000 held-out samples, ~10 min on 2 CPU cores
    python scripts/toy_quality.py --n 200 --out /tmp/q   # a quick look

Figures (all on held-out captions, combinations never seen in training):
- toy-CLIP caption accuracy among 10 candidates on real images (random and one-attribute-off distractors);
- the same accuracy on the teacher's samples (20-step DPM-Solver++, CFG 4.5), and its ratio to the real one;
- FID (clean-fid's Fréchet distance on toy-CLIP features) of the teacher at 20 steps, of its 1-step DDIM
  sample, and of a second real set of the same size (the metric's floor);
- the denoising diagnostic: x0-MSE of the teacher vs. predicting the mean image, at t = 100, 400, 700, 950.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pixsig_distill.config import TOY_WEIGHTS
from pixsig_distill.sampling import generate_images
from pixsig_distill.images import save_grid
from pixsig_distill.schedule import add_noise
from pixsig_distill.teacher import Teacher
from pixsig_distill.toy.clip import caption_accuracy, heldout_images, load_toy_clip
from pixsig_distill.toy.features import FID_DESCRIPTION, toy_fid


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    return (images01.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def x0_diagnostic(teacher: Teacher, images01: torch.Tensor, captions: list[str], seed: int = 0) -> dict:
    """MSE of the teacher's x̂0 (from ε at one noise level) vs. the MSE of the mean latent, per t."""
    vae = teacher.vae
    x0 = vae.encode(images01 * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    embeds, mask = teacher.encode_prompts(captions)
    gen = torch.Generator().manual_seed(seed)
    baseline = (x0 - x0.mean(0, keepdim=True)).pow(2).mean().item()
    out = {"mean_image_mse": baseline}
    for t_value in (100, 400, 700, 950):
        t = torch.full((len(x0),), t_value)
        x_t = add_noise(x0, torch.randn(x0.shape, generator=gen), t, teacher.denoiser.alphas_cumprod)
        pred = teacher.denoiser.x0(x_t, t, embeds, mask, guidance_scale=1.0)
        out[f"t{t_value}"] = (pred - x0).pow(2).mean().item()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="held-out samples per set")
    parser.add_argument("--teacher", default=str(TOY_WEIGHTS / "teacher"))
    parser.add_argument("--out", default="docs/results/toy")
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args()
    if args.n < 10:
        parser.error("--n must be at least 10")
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    clip, _, tokenizer = load_toy_clip()
    real, captions = heldout_images(args.n, seed=1)
    real2, _ = heldout_images(args.n, seed=2)
    teacher = Teacher.from_pretrained(args.teacher, max_sequence_length=16, device="cpu")
    seeds = list(range(args.n))
    fig = {"n": args.n, "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "fid": FID_DESCRIPTION}

    fig["clip_acc_real"] = caption_accuracy(clip, tokenizer, real, captions)
    fig["clip_acc_real_one_attribute"] = caption_accuracy(clip, tokenizer, real, captions, distractors="one_attribute")
    fig["fid_real_vs_real"] = toy_fid(to_uint8(real), to_uint8(real2))

    samples = {}
    for name, kwargs in {"teacher_20": dict(steps=20, guidance_scale=4.5),
                         "teacher_4": dict(steps=4, guidance_scale=4.5),
                         "teacher_ddim_1": dict(steps=1, guidance_scale=4.5, ddim=True)}.items():
        model = teacher
        if kwargs.pop("ddim", False):
            model = Teacher.from_pretrained(args.teacher, max_sequence_length=16, scheduler="DDIMScheduler",
                                            device="cpu")
        images, seconds = generate_images(model, captions, seeds, batch_size=args.batch_size, desc=name, **kwargs)
        samples[name] = images
        fig[f"fid_{name}"] = toy_fid(to_uint8(real), images)
        fig[f"clip_acc_{name}"] = caption_accuracy(clip, tokenizer, to_unit(images), captions)
        fig[f"clip_acc_{name}_one_attribute"] = caption_accuracy(clip, tokenizer, to_unit(images), captions,
                                                                 distractors="one_attribute")
        fig[f"seconds_{name}"] = seconds
    fig["teacher_20_acc_ratio"] = fig["clip_acc_teacher_20"] / fig["clip_acc_real"]
    fig["fid_ratio_20_over_ddim_1"] = fig["fid_teacher_20"] / fig["fid_teacher_ddim_1"]
    fig["x0_diagnostic"] = x0_diagnostic(teacher, real[:500], captions[:500])
    fig["minutes"] = (time.time() - started) / 60

    rows = [to_uint8(real[:8]), samples["teacher_20"][:8], samples["teacher_4"][:8], samples["teacher_ddim_1"][:8]]
    save_grid(np.concatenate(rows), out / "teacher_grid.png", columns=8, scale=4)
    (out / "teacher_quality.json").write_text(json.dumps(fig, indent=1))
    print(json.dumps(fig, indent=1))
    print(f"grid rows: real, teacher 20 steps, teacher 4 steps, teacher 1-step DDIM → {out / 'teacher_grid.png'}")


if __name__ == "__main__":
    main()
