"""Real images as latents with their caption embeddings: what a GAN (DMD2) or a fine-tune compares against.

`LatentBank` hands out random rows (VAE latents, T5 embeddings, masks) of any indexable dataset: the toy world's
renders held in memory, or an encoded image folder. `encode_image_folder` encodes a folder of captioned images
once, by the teacher's VAE and T5, in the text cache's format (`data.write_text_cache`: safetensors shards with
the valid tokens only and the latents as a per-row tensor) under `<folder>/.pixsig-latents/<key>/` (the key
covers the teacher, the resolution, the captions and the bytes of every image). It is read back memory-mapped (`data.CachedTextDataset`),
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
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .data import INDEX, CachedTextDataset, write_text_cache
from .errors import UserError, first_line

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
        pairs = _metadata_pairs(folder)
        unlisted = sorted(set(images) - {p for p, _ in pairs})
        if unlisted:
            raise UserError(f"image folder '{folder}': {len(unlisted)} images have no caption in metadata.jsonl (e.g. "
                            f"{unlisted[0].name}); add a line for each or move them out")
    elif (folder / "captions.txt").is_file():
        captions = _utf8_text(folder / "captions.txt").splitlines()
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
    return _skip_unreadable(folder, pairs, _header_problem)


def _utf8_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"'{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def _metadata_pairs(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) per line of metadata.jsonl, a bad line named by its line number."""
    path, pairs = folder / "metadata.jsonl", []
    for number, line in enumerate(_utf8_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {number}: not JSON ({err.msg}, column {err.colno}); fix that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or "text" not in row:
            raise UserError(f"{path}, line {number}: not {{\"file_name\": \"...\", \"text\": \"...\"}}; fix that line")
        if not isinstance(row["text"], str):  # a null caption would train as the text "None"
            raise UserError(f"{path}, line {number}: the caption of {row['file_name']!r} is not text "
                            f"({row['text']!r}); give every image a caption string")
        pairs.append((folder / row["file_name"], row["text"]))
    return pairs


def _skip_unreadable(folder: Path, pairs: list, problem_of) -> tuple[list[Path], list[str]]:
    """The pairs whose image `problem_of` finds nothing wrong with; the others are skipped, counted and logged with
    the reason."""
    problems = {p: problem_of(p) for p, _ in pairs}
    readable = [(p, c) for p, c in pairs if problems[p] is None]
    if not readable:
        first = next(iter(problems))
        raise UserError(f"image folder '{folder}': none of its {len(pairs)} images can be read as an image (e.g. "
                        f"{first.name}: {problems[first]})")
    if len(readable) < len(pairs):
        bad = next(p for p, _ in pairs if problems[p] is not None)
        log.warning("image folder %s: skipped %d unreadable images of %d (e.g. %s: %s)", folder,
                    len(pairs) - len(readable), len(pairs), bad.name, problems[bad])
    return [p for p, _ in readable], [c for _, c in readable]


def _header_problem(path: Path) -> str | None:
    """Cheap: the header and structure check out (every run)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except Exception as err:  # noqa: BLE001  (PIL raises many kinds)
        return first_line(err, 100)


def _decode_problem(path: Path) -> str | None:
    """Thorough: the whole image decodes to RGB (once, before a folder is encoded)."""
    try:
        _load_resized(path, 8)
        return None
    except Exception as err:  # noqa: BLE001  (a corrupt data stream surfaces as OSError, SyntaxError, ...)
        return first_line(err, 100)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB with the colours a viewer shows: EXIF rotation applied, 16- and 32-bit
    grayscale scaled to 8 bits (a plain convert clips them to white), float images scaled from [0, 1], and
    transparency composited over white (a plain convert turns transparent pixels black)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 65535 * 255  # 16-bit samples (PIL opens 16-bit grayscale PNGs as I or I;16)
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, 1 ...


def _load_resized(path: Path, size: int) -> np.ndarray:
    """Centre crop to a square, then resize (bicubic) to the model's resolution, as RGB (`to_rgb`)."""
    with Image.open(path) as image:
        image = to_rgb(image)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        return np.asarray(image.resize((size, size), Image.BICUBIC) if side != size else image)


def _content_digest(path: Path) -> str:
    """The image's bytes, hashed: an image edited in place (even at the same size) is encoded again."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_image_folder(teacher, folder: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Encode a captioned folder once (VAE latents + T5 embeddings, text-cache shards); returns the cache folder.

    The cache is keyed by the teacher, the resolution and the captions and bytes of every image, so any change
    re-encodes."""
    folder = Path(folder).expanduser()
    paths, captions = read_captioned_folder(folder)
    key = hashlib.sha256(json.dumps([str(getattr(teacher.pipe, "name_or_path", "")), teacher.resolution,
                                     teacher.max_sequence_length, [(p.name, _content_digest(p)) for p in paths],
                                     captions]).encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir else folder / ".pixsig-latents" / key
    if (cache / INDEX).is_file():  # written last: the cache is complete
        if json.loads((cache / INDEX).read_text()).get("images_key") == key:
            return cache
        raise UserError(f"cache folder '{cache}' holds other encodings (of other images, another teacher, or written "
                        f"by an older version of pixsig-distill); give an empty folder as the cache, or delete it to "
                        f"re-encode")
    if teacher.pipe.text_encoder is None:
        raise UserError(f"the images of '{folder}' are not encoded yet and this teacher was loaded without T5 "
                        f"(model.load_text_encoder=false), which their captions need; run once with "
                        f"model.load_text_encoder=true (the encodings are then cached in {cache})")
    from .config import writable_folder_error

    problem = writable_folder_error(cache)
    if problem:
        raise UserError(f"cannot write the encodings of '{folder}' to '{cache}' ({problem}); give a writable cache "
                        f"folder: data.cache_dir=DIR (data=images), distill.gan.real_images.cache_dir=DIR (DMD2), "
                        f"or out_dir=DIR (cache_text images=...)")
    paths, captions = _skip_unreadable(folder, list(zip(paths, captions)), _decode_problem)  # a corrupt data stream

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


def blank_real_images(node) -> dict:
    """What a plan builds instead of a real-image bank: zero rows of the right shapes, nothing read or encoded."""
    return {"_target_": "pixsig_distill.fake_step.BlankRealImages", "_partial_": True}


image_folder_latents.plan_stand_in = blank_real_images


def image_folder_dataset(teacher, folder: str | Path, cache_dir: str | Path | None = None) -> CachedTextDataset:
    """A captioned folder as training items (prompt, T5 embedding, mask, VAE latents): what `distill=finetune` trains
    on (`data=images`)."""
    return CachedTextDataset(encode_image_folder(teacher, folder, cache_dir))
