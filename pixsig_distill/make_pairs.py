"""`python -m pixsig_distill.make_pairs`: the teacher's noise → latents pairs for DMD's regression loss.

Each pair stores the noise z_i, the teacher's multi-step sample y_i from it, and the prompt's T5
embedding, so training needs neither T5 nor the teacher's sampler. Read them back with
`CachedTextDataset` (items gain `noise` and `latents`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from .config import build, check_float, check_int
from .data import check_prompts, write_text_cache
from .prompts import load_prompts
from .console import entry_point


def validate(cfg: DictConfig) -> int | None:
    """The values' ranges; the number of pairs to make (None: one per prompt)."""
    for key, low in (("num_inference_steps", 1), ("seed", 0), ("shard_size", 1), ("batch_size", 1)):
        check_int(cfg, key, low)
    check_float(cfg, "guidance_scale", 0.0, hint="use a number >= 0 (the teacher's CFG scale is 4.5)")
    return None if cfg.max_pairs is None else check_int(cfg, "max_pairs", 1)


def make_pairs(cfg: DictConfig) -> Path:
    max_pairs = validate(cfg)
    prompts = check_prompts(load_prompts(cfg.prompts))[:max_pairs]
    teacher = build(cfg.model)

    def teacher_sample(embeds, mask, first_index):
        # Noise of pair i depends only on (seed, i): shards can be made in any order or in parallel.
        noise = torch.stack([torch.randn(teacher.latent_shape(1)[1:], generator=torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + first_index + k)) for k in range(embeds.shape[0])]).to(teacher.device, teacher.dtype)
        latents = teacher.sample(embeds=embeds, mask=mask, noise=noise, num_inference_steps=cfg.num_inference_steps,
                                 guidance_scale=cfg.guidance_scale)
        return {"noise": noise.float(), "latents": latents.float()}

    meta = {"model": str(cfg.model.pretrained), "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale, "seed": cfg.seed, "source": str(cfg.prompts)}
    with tqdm(total=len(prompts), desc="teacher pairs") as bar:
        out = write_text_cache(cfg.out_dir, prompts, teacher.encode_prompts, teacher.null_embedding(1),
                               shard_size=cfg.shard_size, batch_size=cfg.batch_size, meta=meta, progress=bar,
                               extras=teacher_sample)
    print(f"wrote {len(prompts)} teacher pairs to {out}")
    return out


main = entry_point("make_pairs", make_pairs, validate=validate)


if __name__ == "__main__":
    main()
