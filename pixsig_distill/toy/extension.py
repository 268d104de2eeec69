"""An extension of the toy world that the shipped teacher has never seen: purple shapes.

The fine-tuning demonstration (docs/finetune.md) writes it out as a captioned image folder, fine-tunes the
toy teacher on it and distils the fine-tune. Purple (130, 40, 190) sits about 105–120 RGB units from its
nearest world colours (magenta, blue) and from the gray and navy backgrounds, so the rule-based read-back
(`attributes.read_attributes` with `EXTENDED_COLOURS`) tells it apart. The word "purple" is not in the toy
tokenizer's vocabulary: it reaches the frozen T5 as characters, which the fine-tuned transformer learns to
read.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, COLOURS, HELDOUT_FRACTION, POSITIONS, SHAPES, SIZES, Scene, split_scenes

NEW_COLOURS: dict[str, tuple[int, int, int]] = {"purple": (130, 40, 190)}
EXTENDED_COLOURS = {**COLOURS, **NEW_COLOURS}
_SALT = "pixsig-toy-extension-heldout-v1"


@dataclass(frozen=True, order=True)
class ExtensionScene(Scene):
    def __post_init__(self) -> None:
        if self.colour not in NEW_COLOURS:
            raise ValueError(f"unknown extension colour {self.colour!r}; valid: {', '.join(NEW_COLOURS)}")

    @property
    def rgb(self) -> tuple[int, int, int]:
        return NEW_COLOURS[self.colour]


@lru_cache(maxsize=None)
def _scenes(split: str) -> tuple[ExtensionScene, ...]:
    scenes = sorted(ExtensionScene(*attrs)
                    for attrs in itertools.product(SHAPES, NEW_COLOURS, SIZES, POSITIONS, BACKGROUNDS))
    ranked = sorted(scenes, key=lambda sc: hashlib.sha256(f"{_SALT}|{sc.caption}".encode()).hexdigest())
    heldout = set(ranked[: round(HELDOUT_FRACTION * len(scenes))])
    return tuple(sc for sc in scenes if (sc in heldout) == (split == "heldout"))


def extension_scenes(split: str = "train") -> list[ExtensionScene]:
    """The purple scenes of a split ("train" or "heldout", disjoint, like the world's)."""
    return list(_scenes(split))


def render(scenes, n: int, seed: int, resolution: int = 32) -> tuple[np.ndarray, list[str]]:
    """`n` images cycling through `scenes` (a seeded order), jittered like the world's."""
    rng = np.random.default_rng([seed, 0])
    order = [scenes[i] for i in np.concatenate([rng.permutation(len(scenes)) for _ in range(n // len(scenes) + 1)])]
    images = [scene.render(resolution, np.random.default_rng([seed, 1, i])) for i, scene in enumerate(order[:n])]
    return np.stack(images), [scene.caption for scene in order[:n]]


def write_finetune_folder(out: str | Path, n_new: int = 1500, n_old: int = 1500, seed: int = 0) -> Path:
    """The fine-tuning set: `n_new` purple images (train split) and `n_old` images of the world the teacher knows
    (its train split: replay, so that the fine-tune keeps what the teacher could do), with captions.txt; and
    prompts.txt, every training caption of both (the prompts to distil the fine-tune on)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    new, new_captions = render(extension_scenes("train"), n_new, seed)
    old, old_captions = render(split_scenes("train"), n_old, seed + 1)
    images, captions = np.concatenate([new, old]), new_captions + old_captions
    order = np.random.default_rng([seed, 2]).permutation(len(images))
    for k, i in enumerate(order):
        Image.fromarray(images[i]).save(out / f"{k:05d}.png")
    (out / "captions.txt").write_text("\n".join(captions[i] for i in order) + "\n")
    prompts = [sc.caption for sc in split_scenes("train")] + [sc.caption for sc in extension_scenes("train")]
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return out
