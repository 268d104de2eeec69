"""`python -m pixsig_distill.cache_text prompts=FILE out_dir=DIR [model=...]`: T5 embeddings → safetensors shards;
`images=FOLDER` instead: a captioned image folder's VAE latents and caption embeddings, in the same format."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from .config import build, check_int  # importing config also registers its resolvers
from .data import check_prompts, write_text_cache
from .prompts import load_prompts
from .real_images import encode_image_folder
from .console import entry_point

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    for key in ("shard_size", "batch_size"):
        check_int(cfg, key, 1)


def cache_text(cfg: DictConfig) -> Path:
    validate(cfg)
    if cfg.images is not None:
        out = encode_image_folder(build(cfg.model), cfg.images, cache_dir=cfg.out_dir)
        print(f"wrote the VAE latents and caption embeddings of {cfg.images} to {out}; train with "
              f"distill.gan.real_images.cache_dir={out} (DMD2) or data.cache_dir={out} (data=images)")
        return out
    prompts = check_prompts(load_prompts(cfg.prompts))
    teacher = build(cfg.model)
    meta = {"model": str(cfg.model.pretrained), "max_sequence_length": int(cfg.model.max_sequence_length),
            "source": str(cfg.prompts)}
    with tqdm(total=len(prompts), desc="T5 embeddings") as bar:
        out = write_text_cache(cfg.out_dir, prompts, teacher.encode_prompts, teacher.null_embedding(1),
                               shard_size=cfg.shard_size, batch_size=cfg.batch_size, meta=meta, progress=bar)
    log.info("cached %d prompts in %s", len(prompts), out)
    print(f"wrote {len(prompts)} prompt embeddings to {out}")
    return out


main = entry_point("cache_text", cache_text, validate=validate)


if __name__ == "__main__":
    main()
