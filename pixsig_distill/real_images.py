"""Real images as latents with their caption embeddings: what a GAN (DMD2) or a fine-tune compares against.

`LatentBank` hands out random rows (VAE latents, T5 embeddings, masks) of any indexable dataset: the toy world's
renders held in memory, or an encoded image folder. `encode_image_folder` encodes a folder of captioned images
once, by the teacher's VAE and T5, in the text cache's format (`data.write_text_cache`: safetensors shards with
the valid tokens only and the latents as a per-row tensor) under `<folder>/.pixsig-latents/<key>/` (the key
covers the teacher, the resolution and the file list). It is read back memory-mapped (`data.CachedTextDataset`),
so later runs neither re-encode nor keep the encoders busy, and a folder of any size costs no RAM: padded to
300 tokens in memory, PixArt's T5 features alone would take 4.9 MB per image in float32.
Captions: `metadata.jsonl` ({"file_name", "text"} per line, the Hugging Face image-folder convention) or
`captions.txt` (one line per image, in name order).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import INDEX, CachedTextDataset, write_text_cache
from .errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class LatentBank:
    """Random rows of a dataset whose items hold "latents", "embeds" and "mask"."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, batch_size: int, gen, device, dtype) -> tuple[torch.Tensor, ...]:
        """`batch_size` random rows; `gen` is the step's draws.StepDraws."""
        items = [self.dataset[i] for i in gen.randint(0, len(self), batch_size).tolist()]
        latents, embeds, mask = (torch.stack([item[key] for item in items]) for key in ("latents", "embeds", "mask"))
        return latents.to(device, torch.float32), embeds.to(device, dtype), mask.to(device)


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
            pairs = [(folder / r["file_name"], r["text"]) for r in rows]
            bad = [r["file_name"] for r in rows if not isinstance(r["text"], str)]
            if bad:  # a null caption would train as the text "None"
                raise UserError(f"{folder / 'metadata.jsonl'}: {len(bad)} captions are not text (e.g. {bad[0]!r}: "
                                f"null or a number); give every image a caption string")
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


def encode_image_folder(teacher, folder: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Encode a captioned folder once (VAE latents + T5 embeddings, text-cache shards); returns the cache folder."""
    folder = Path(folder).expanduser()
    paths, captions = read_captioned_folder(folder)
    key = hashlib.sha256(json.dumps([str(getattr(teacher.pipe, "name_or_path", "")), teacher.resolution,
                                     teacher.max_sequence_length, [(p.name, p.stat().st_size) for p in paths],
                                     captions]).encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir else folder / ".pixsig-latents" / key
    if (cache / INDEX).is_file():  # written last: the cache is complete
        if json.loads((cache / INDEX).read_text()).get("images_key") == key:
            return cache
        raise UserError(f"cache folder '{cache}' holds the encodings of other images or of another teacher; give "
                        f"an empty folder as the cache, or delete it to re-encode")
    if teacher.pipe.text_encoder is None:
        raise UserError(f"the images of '{folder}' are not encoded yet and this teacher was loaded without T5 "
                        f"(model.load_text_encoder=false), which their captions need; run once with "
                        f"model.load_text_encoder=true (the encodings are then cached in {cache})")

    def latents(embeds, mask, first: int) -> dict:  # the images of the captions just encoded, in the same rows
        rows = range(first, first + len(embeds))
        return {"latents": encode_images(teacher, np.stack([_load_resized(paths[i], teacher.resolution)
                                                            for i in rows]))}

    with tqdm(total=len(paths), desc=f"encoding {folder.name}") as bar:
        write_text_cache(cache, captions, teacher.encode_prompts, teacher.null_embedding(1), extras=latents,
                         meta={"images_key": key, "images": str(folder), "resolution": teacher.resolution},
                         progress=bar)
    return cache


def image_folder_latents(teacher, folder: str | Path, cache_dir: str | Path | None = None) -> LatentBank:
    """DMD2's real data for a real model: random rows of the encoded folder (`distill/gan/real_images=folder`)."""
    return LatentBank(CachedTextDataset(encode_image_folder(teacher, folder, cache_dir)))


def image_folder_dataset(teacher, folder: str | Path, cache_dir: str | Path | None = None) -> CachedTextDataset:
    """A captioned folder as training items (prompt, T5 embedding, mask, VAE latents): what `distill=finetune` trains
    on (`data=images`)."""
    return CachedTextDataset(encode_image_folder(teacher, folder, cache_dir))
