"""Real images as latents with their caption embeddings: what a GAN (DMD2) or a fine-tune compares against.

`LatentBank` holds (latents, T5 embeddings, masks) and hands out random rows. `ImageFolderLatents` makes one
from a folder of captioned images, encoded once by the teacher's VAE and T5 and kept as safetensors shards
under `<folder>/.pixsig-latents/<key>/` (the key covers the teacher, the resolution and the file list), so
later runs neither re-encode nor keep the encoders busy. Captions: `metadata.jsonl` ({"file_name", "text"}
per line, the Hugging Face image-folder convention) or `captions.txt` (one line per image, in name order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD = 1024


class LatentBank:
    def __init__(self, latents: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor):
        self.latents, self.embeds, self.mask = latents, embeds, mask

    def __len__(self) -> int:
        return len(self.latents)

    def sample(self, batch_size: int, gen, device, dtype) -> tuple[torch.Tensor, ...]:
        """`batch_size` random rows; `gen` is the step's draws.StepDraws."""
        rows = gen.randint(0, len(self), batch_size)
        return (self.latents[rows].to(device, torch.float32), self.embeds[rows].to(device, dtype),
                self.mask[rows].to(device))


@torch.no_grad()
def encode_images(teacher, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """(N, H, W, 3) uint8 → VAE latents × scaling factor (the posterior mean: deterministic), float32 on CPU."""
    vae, out = teacher.vae, []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        posterior = vae.encode(x.to(teacher.device, vae.dtype)).latent_dist
        out.append((posterior.mean * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_captions(teacher, captions: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, masks = [], []
    for start in range(0, len(captions), batch_size):
        e, m = teacher.encode_prompts(captions[start:start + batch_size])
        embeds.append(e.cpu())
        masks.append(m.cpu())
    return torch.cat(embeds), torch.cat(masks)


def read_captioned_folder(folder: Path) -> tuple[list[Path], list[str]]:
    """Image paths and their captions from `metadata.jsonl` or `captions.txt`, checked before anything is encoded:
    every image has a caption and every caption an image; unreadable images are skipped and counted."""
    if not folder.is_dir():
        raise UserError(f"image folder '{folder}' does not exist; give a folder of images with metadata.jsonl or "
                        f"captions.txt")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if (folder / "metadata.jsonl").is_file():
        try:
            rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
            pairs = [(folder / r["file_name"], str(r["text"])) for r in rows]
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{folder / 'metadata.jsonl'}: a line is not {{\"file_name\": \"...\", \"text\": "
                            f"\"...\"}} ({type(err).__name__}: {err}); fix that line") from None
        unlisted = sorted(set(images) - {p for p, _ in pairs})
        if unlisted:
            raise UserError(f"image folder '{folder}': {len(unlisted)} images have no caption in metadata.jsonl (e.g. "
                            f"{unlisted[0].name}); add a line for each or move them out")
    elif (folder / "captions.txt").is_file():
        captions = (folder / "captions.txt").read_text(encoding="utf-8").splitlines()
        while captions and not captions[-1].strip():
            captions.pop()
        if len(captions) != len(images):
            raise UserError(f"{folder / 'captions.txt'} has {len(captions)} lines for {len(images)} images; give "
                            f"exactly one caption per image, in file-name order")
        pairs = list(zip(images, captions))
    else:
        raise UserError(f"image folder '{folder}' has no metadata.jsonl or captions.txt; add one "
                        f"(docs/finetune.md)")
    if not pairs:
        raise UserError(f"image folder '{folder}' lists no images; add images and their captions")
    missing = [p for p, _ in pairs if not p.is_file()]
    if missing:
        raise UserError(f"image folder '{folder}': {len(missing)} listed images are missing (e.g. {missing[0].name})")
    empty = [p for p, c in pairs if not c.strip()]
    if empty:
        raise UserError(f"image folder '{folder}': {len(empty)} images have an empty caption (e.g. {empty[0].name})")
    readable = [(p, c) for p, c in pairs if _readable(p)]
    if not readable:
        raise UserError(f"image folder '{folder}': none of its {len(pairs)} images can be read as an image")
    if len(readable) < len(pairs):
        bad = next(p for p, _ in pairs if not _readable(p))
        log.warning("image folder %s: skipped %d unreadable images of %d (e.g. %s)", folder,
                    len(pairs) - len(readable), len(pairs), bad.name)
    return [p for p, _ in readable], [c for _, c in readable]


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def _load_resized(path: Path, size: int) -> np.ndarray:
    """Centre crop to a square, then resize (bicubic) to the model's resolution; any mode (L, RGBA, P) → RGB."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        return np.asarray(image.resize((size, size), Image.BICUBIC) if side != size else image)


def ImageFolderLatents(teacher, folder: str | Path, cache_dir: str | Path | None = None) -> LatentBank:
    """The images of a captioned folder as a `LatentBank`, encoded once and cached as safetensors shards."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder).expanduser()
    paths, captions = read_captioned_folder(folder)
    key = hashlib.sha256(json.dumps([str(getattr(teacher.pipe, "name_or_path", "")), teacher.resolution,
                                     teacher.max_sequence_length, [(p.name, p.stat().st_size) for p in paths],
                                     captions]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir else folder / ".pixsig-latents" / key
    shards = [cache / f"shard-{i:05d}.safetensors" for i in range(0, (len(paths) + SHARD - 1) // SHARD)]
    null = cache / "null.safetensors"  # the empty prompt's embedding: CFG's unconditional branch without T5
    if not all(s.is_file() for s in (*shards, null)):
        if teacher.pipe.text_encoder is None:
            raise UserError(f"the images of '{folder}' are not encoded yet and this teacher was loaded without T5 "
                            f"(model.load_text_encoder=false), which their captions need; run once with "
                            f"model.load_text_encoder=true (the encodings are then cached in {cache})")
        cache.mkdir(parents=True, exist_ok=True)
        for number, shard in enumerate(shards):
            if shard.is_file():
                continue
            rows = range(number * SHARD, min((number + 1) * SHARD, len(paths)))
            images = np.stack([_load_resized(paths[i], teacher.resolution) for i in rows])
            embeds, mask = encode_captions(teacher, [captions[i] for i in rows])
            tmp = shard.with_name(f".{shard.name}.tmp{os.getpid()}")
            save_file({"latents": encode_images(teacher, images).contiguous(), "embeds": embeds.contiguous(),
                       "mask": mask.contiguous()}, str(tmp))
            tmp.replace(shard)  # a shard that exists is complete
        embeds, mask = encode_captions(teacher, [""])
        tmp = null.with_name(f".{null.name}.tmp{os.getpid()}")
        save_file({"embeds": embeds.contiguous(), "mask": mask.contiguous()}, str(tmp))
        tmp.replace(null)
    parts = [load_file(str(s)) for s in shards]
    bank = LatentBank(*(torch.cat([p[k] for p in parts]) for k in ("latents", "embeds", "mask")))
    bank.null, bank.captions = load_file(str(null)), captions
    return bank


class ImageFolderDataset(torch.utils.data.Dataset):
    """A captioned image folder as training items (prompt, T5 embedding, mask, VAE latents), encoded once by the
    teacher and cached (`ImageFolderLatents`): what `distill=finetune` trains on (`data=images`)."""

    def __init__(self, teacher, folder: str | Path, cache_dir: str | Path | None = None):
        self.bank = ImageFolderLatents(teacher, folder, cache_dir)
        self.captions = self.bank.captions

    def __len__(self) -> int:
        return len(self.bank)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.captions[i], "embeds": self.bank.embeds[i], "mask": self.bank.mask[i],
                "latents": self.bank.latents[i]}

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's embedding (L, D) and mask (L,): caption dropout and CFG without T5."""
        return self.bank.null["embeds"][0], self.bank.null["mask"][0]
