"""Prompt sets for evaluation, and the real images FID and the ceiling row compare against.

A prompt set is built from config (`eval.prompts`, a `_target_`) or, for `prompts=PATH` on the
command line, from a file:

* a UTF-8 text file, one prompt per line (`prompt_file`);
* a COCO caption JSON (`coco_captions`): `captions_val2014.json` for the COCO-2014 30k protocol;
* an MJHQ-30K folder (`mjhq`): `meta_data.json` and the images by category;
* the toy world's held-out captions (`evaluation.toy_world.heldout_prompt_set`), which also
  render fresh real images for the ceiling row and for the diversity reference.

`n` picks the first n prompts; a prompt file shorter than n is cycled (each repeat gets its own
seed, so the images differ); a benchmark (COCO, MJHQ) gives at most its own size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pixsig_distill.data import read_prompt_file
from pixsig_distill.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class PromptSet:
    prompts: list[str]
    source: str
    real: object | None = None  # (N, H, W, 3) uint8 array or ImageFiles, for FID; None if the source has none

    def real_draw(self):
        """Real images for the prompts that are not the FID reference (the ceiling row), or None."""
        return None

    def real_groups(self, prompts: list[str], draw: int = 0):
        """Real images for a list of prompts with repeats (the diversity reference), or None."""
        return None


class ImageFiles:
    """A lazy, indexable list of image files: item i is (H, W, 3) uint8, read when asked for.

    Lets FID and CLIP stream over 30k images without holding them in memory."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        with Image.open(self.paths[i]) as image:
            return np.asarray(image.convert("RGB"))


def image_folder(folder: str | Path) -> ImageFiles:
    """Every image directly inside `folder`, in name order."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"real image folder '{folder}' does not exist; set fid.real to a folder of reference images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"real image folder '{folder}' has no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageFiles(paths)


def _first(prompts: list[str], n: int | None) -> list[str]:
    if n is None:
        return prompts
    return [prompts[i % len(prompts)] for i in range(n)]


def prompt_file(path: str | Path, n: int | None = None, real: str | None = None) -> PromptSet:
    """A UTF-8 prompt file, one prompt per line; `real`: a folder of reference images for FID."""
    return PromptSet(_first(read_prompt_file(Path(path).expanduser()), n), str(path),
                     image_folder(real) if real else None)


def coco_captions(path: str | Path, n: int | None = 30000, images: str | None = None,
                  seed: int | None = 0) -> PromptSet:
    """The COCO-2014 30k protocol: `n` captions of distinct images drawn from a caption JSON with a fixed seed
    (one caption per image, as in the GigaGAN / PixArt evaluations; `seed=None`: file order); `images`: the
    val2014 folder, whose images of those captions are the FID reference."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"COCO caption file '{path}' does not exist; download captions_val2014.json "
                        f"(annotations_trainval2014.zip) and pass its path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        pairs = [(a.get("image_id", i), str(a["caption"]).strip()) for i, a in enumerate(data["annotations"])]
        files = {im["id"]: im["file_name"] for im in data.get("images", [])}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"'{path}' is not a COCO caption file ({type(err).__name__}: {err}); expected "
                        f'{{"annotations": [{{"image_id": ..., "caption": "..."}}, ...]}}') from None
    first = {}
    for image_id, caption in pairs:  # the first caption of each image
        if caption:
            first.setdefault(image_id, caption)
    if not first:
        raise UserError(f"COCO caption file '{path}' has no captions")
    ids = list(first)  # file order
    if seed is not None:
        ids = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    chosen = ids[:n or len(ids)]
    real = None
    if images:
        folder = Path(images).expanduser()
        missing = [files.get(i) for i in chosen[:3] if not files.get(i) or not (folder / files[i]).is_file()]
        if missing:
            raise UserError(f"COCO images folder '{folder}' lacks the images of the chosen captions (e.g. "
                            f"{missing[0]}); pass the val2014 folder that matches '{path.name}'")
        real = ImageFiles([folder / files[i] for i in chosen])
    return PromptSet([first[i] for i in chosen], str(path) if seed is None else f"{path} (COCO, {len(chosen)} images, seed {seed})",
                     real)


def mjhq(folder: str | Path, n: int | None = 30000, category: str | None = None) -> PromptSet:
    """MJHQ-30K: `folder/meta_data.json` ({id: {"prompt", "category"}}) and `folder/mjhq30k_imgs/<category>/<id>.jpg`
    (or the images directly under `folder/<category>/`); `category`: one of its 10 categories, or all."""
    folder = Path(folder).expanduser()
    meta_path = folder / "meta_data.json"
    if not meta_path.is_file():
        raise UserError(f"'{folder}' is not an MJHQ-30K folder (no meta_data.json); download it from the "
                        f"playgroundai/MJHQ-30K dataset and pass its folder")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    items = sorted((k, v) for k, v in meta.items() if category is None or v.get("category") == category)
    if not items:
        raise UserError(f"MJHQ-30K has no images of category '{category}'")
    items = items[:n or len(items)]
    root = folder / "mjhq30k_imgs" if (folder / "mjhq30k_imgs").is_dir() else folder
    paths = [root / v["category"] / f"{k}.jpg" for k, v in items]
    real = ImageFiles(paths) if all(p.is_file() for p in paths[:3]) else None
    return PromptSet([v["prompt"] for _, v in items], f"{folder} (MJHQ-30K{', ' + category if category else ''})",
                     real)


def load_prompt_set(source: str, n: int | None = None, real: str | None = None) -> PromptSet:
    """`prompts=PATH` from the command line: a COCO caption .json or a prompt file."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".json":
        prompt_set = coco_captions(path, n, seed=None)
        if real:
            prompt_set.real = image_folder(real)
        return prompt_set
    return prompt_file(path, n, real)
