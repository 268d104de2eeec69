"""Prompt sets for the leaderboard, and the real images FID compares against.

Three sources, picked by `source`:

* `toy_heldout` (default): the toy world's held-out captions, with their rendered images as
  the real set — the same captions, order and images as `pixsig_distill.toy.evaluate.ToyEvaluator`,
  so the leaderboard and a training run's `eval.json` agree.
* a `.json` file in COCO caption layout, `{"annotations": [{"caption": ...}, ...]}` (e.g.
  `captions_val2014.json`); captions are taken in file order.
* any other path: a UTF-8 text file, one prompt per line (`pixsig_distill.data.read_prompt_file`).

`n` picks the first n prompts; a set shorter than n is cycled (each repeat gets its own seed,
so the images differ).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pixsig_distill.data import read_prompt_file
from pixsig_distill.errors import UserError

TOY_SOURCE = "toy_heldout"
TOY_SEED = 1  # ToyEvaluator's held-out stream
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class PromptSet:
    prompts: list[str]
    source: str
    real: object | None = None  # (N, H, W, 3) uint8 array or ImageFiles, for FID; None if the source has none


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


def _coco_captions(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        captions = [str(a["caption"]).strip() for a in data["annotations"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"'{path}' is not a COCO caption file ({type(err).__name__}: {err}); expected "
                        f'{{"annotations": [{{"caption": "..."}}, ...]}}') from None
    captions = [c for c in captions if c]
    if not captions:
        raise UserError(f"COCO caption file '{path}' has no captions")
    return captions


def _first(prompts: list[str], n: int | None) -> list[str]:
    if n is None:
        return prompts
    return [prompts[i % len(prompts)] for i in range(n)]


def load_prompt_set(source: str = TOY_SOURCE, n: int | None = None) -> PromptSet:
    """The prompts to evaluate on (and, for the toy world, its real images)."""
    if source == TOY_SOURCE:
        from pixsig_distill.toy.clip import heldout_images

        images, captions = heldout_images(n or 1000, seed=TOY_SEED)
        real = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return PromptSet(captions, source, real)
    path = Path(source).expanduser()
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise UserError(f"COCO caption file '{path}' does not exist")
        return PromptSet(_first(_coco_captions(path), n), str(path))
    return PromptSet(_first(read_prompt_file(path), n), str(path))
