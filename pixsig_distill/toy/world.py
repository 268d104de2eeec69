"""A tiny procedural world of captioned images: one coloured shape on a plain background.

It is the embedded "toy world" of the project: it needs no downloads, is fully
deterministic from a seed, and is small enough that a toy text-to-image model can
learn it on a CPU. Every caption is built from five attributes::

    "a small red circle at the top left on a navy background"

giving 3 shapes x 7 colours x 3 sizes x 9 positions x 4 backgrounds = 2268 captions.
About 12% of the combinations form a fixed *held-out* split that never occurs in
training, so a model can be scored on compositions it has not seen, while every
single attribute value and every (shape, colour) pair still occurs in training.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle")

# Saturated colours that stay far apart (in RGB) from each other and from every
# background even after the anti-aliasing blur, so a small model can tell them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 255),
    "yellow": (250, 230, 20),
    "cyan": (20, 225, 235),
    "magenta": (230, 30, 220),
    "orange": (255, 125, 0),
}

# Radius in pixels at the reference 32 px resolution; scaled with the resolution.
SIZES: dict[str, float] = {"small": 3.0, "medium": 5.0, "large": 7.0}

# Position name -> (x, y) centre as a fraction of the image side. The grid is at
# quarters rather than cell centres so that large shapes fit inside the image.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}

# Backgrounds chosen to contrast with all shape colours (navy is far darker than blue,
# gray is mid-level where every saturated colour has a channel near 0 or 255).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (120, 120, 120),
    "navy": (10, 15, 80),
}

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.12
# Changing this salt changes the held-out split; keep it fixed so results stay comparable.
_SPLIT_SALT = "pixsig-toy-world-heldout-v1"

_REFERENCE_RESOLUTION = 32
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: clean anti-aliased edges
_POSITION_JITTER = 1.5  # max offset in px at 32 px, so same-caption images differ
_SIZE_JITTER = 0.1  # relative radius jitter


def _position_phrase(position: str) -> str:
    """'center' reads as 'in the center'; every other grid cell as 'at the ...'."""
    return "in the center" if position == "center" else f"at the {position}"


@dataclass(frozen=True, order=True)
class Scene:
    """One caption's worth of attributes; rendering adds per-image jitter."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for field, value, valid in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")

    @property
    def caption(self) -> str:
        return (
            f"a {self.size} {self.colour} {self.shape} "
            f"{_position_phrase(self.position)} on a {self.background} background"
        )

    def center(self, resolution: int = _REFERENCE_RESOLUTION) -> tuple[float, float]:
        """Nominal (x, y) centre of the object in pixels, before jitter."""
        fx, fy = POSITIONS[self.position]
        return fx * resolution, fy * resolution

    def render(self, resolution: int = _REFERENCE_RESOLUTION, rng: np.random.Generator | None = None) -> np.ndarray:
        """Draw the scene as an (H, W, 3) uint8 array.

        With an ``rng`` the position and size are jittered slightly, so images that
        share a caption differ; without one the nominal scene is drawn.
        """
        scale = resolution / _REFERENCE_RESOLUTION
        cx, cy = self.center(resolution)
        radius = SIZES[self.size] * scale
        if rng is not None:
            cx += rng.uniform(-_POSITION_JITTER, _POSITION_JITTER) * scale
            cy += rng.uniform(-_POSITION_JITTER, _POSITION_JITTER) * scale
            radius *= 1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)

        # Extent of the shape around its centre: (left, top, right, bottom).
        if self.shape == "triangle":
            # Equilateral, pointing up, centred on its centroid; the circumradius is
            # larger than `radius` so its area is comparable to the other shapes.
            big = 1.35 * radius
            half_w = big * np.sqrt(3) / 2
            extent = (half_w, big, half_w, big / 2)
        else:
            extent = (radius, radius, radius, radius)
        # Keep the whole shape inside the image (matters for large shapes at edges).
        margin = 0.5 * scale
        cx = float(np.clip(cx, extent[0] + margin, resolution - extent[2] - margin))
        cy = float(np.clip(cy, extent[1] + margin, resolution - extent[3] - margin))

        return draw_shape(self.shape, cx, cy, radius, resolution, BACKGROUNDS[self.background], self.rgb)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


def draw_shape(shape: str, cx: float, cy: float, radius: float, resolution: int, background, fill) -> np.ndarray:
    """One shape centred at (cx, cy) px, anti-aliased: (H, W, 3) uint8 for RGB colours, (H, W) for ints.

    A triangle is equilateral, pointing up, centred on its centroid, with circumradius 1.35 x ``radius``."""
    s = _SUPERSAMPLE
    canvas = Image.new("RGB" if isinstance(fill, tuple) else "L", (resolution * s, resolution * s), background)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * s, cy * s, radius * s
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        big = 1.35 * r
        half_w = big * np.sqrt(3) / 2
        draw.polygon([(x, y - big), (x + half_w, y + big / 2), (x - half_w, y + big / 2)], fill=fill)
    # BOX is an exact average over each 4x4 block: no ringing, and pure background
    # pixels keep their exact colour.
    return np.array(canvas.resize((resolution, resolution), Image.BOX), dtype=np.uint8)


@lru_cache(maxsize=None)
def _all_scenes() -> tuple[Scene, ...]:
    return tuple(sorted(Scene(*attrs) for attrs in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS)))


def all_scenes() -> list[Scene]:
    """Every attribute combination, sorted by (shape, colour, size, position, background)."""
    return list(_all_scenes())


@lru_cache(maxsize=None)
def _split(split: str) -> tuple[Scene, ...]:
    scenes = _all_scenes()
    # Rank by a salted hash of the caption: stable across Python versions and
    # machines (unlike hash()), and independent of any training seed.
    ranked = sorted(scenes, key=lambda sc: hashlib.sha256(f"{_SPLIT_SALT}|{sc.caption}".encode()).hexdigest())
    heldout = set(ranked[: round(HELDOUT_FRACTION * len(scenes))])
    return tuple(sc for sc in scenes if (sc in heldout) == (split == "heldout"))


def split_scenes(split: str) -> list[Scene]:
    """The sorted scenes of a split: "train" or "heldout" (disjoint, together all scenes)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return list(_split(split))


def split_captions(split: str) -> list[str]:
    """Every caption of a split, sorted (the named prompt sets toy_train / toy_heldout)."""
    return [scene.caption for scene in split_scenes(split)]


def _scene_for_index(scenes: tuple[Scene, ...], seed: int, index: int) -> Scene:
    """Walk through the split in a fresh seeded permutation per pass, so any
    ``len(scenes)`` consecutive items cover the whole split exactly once."""
    epoch, offset = divmod(index, len(scenes))
    order = np.random.default_rng([seed, 0, epoch]).permutation(len(scenes))
    return scenes[order[offset]]


def _render_item(scenes: tuple[Scene, ...], seed: int, index: int, resolution: int) -> tuple[Scene, np.ndarray]:
    scene = _scene_for_index(scenes, seed, index)
    # The stream tag 1 keeps the rendering rng independent of the permutation rng.
    return scene, scene.render(resolution, np.random.default_rng([seed, 1, index]))


class ToyWorldDataset(torch.utils.data.Dataset):
    """``size`` captioned images of one split; item i depends only on (seed, i).

    Items are dicts ``{"image": float tensor (3, H, W) in [-1, 1], "caption": str}``.
    """

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0, resolution: int = _REFERENCE_RESOLUTION):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.scenes = tuple(split_scenes(split))
        self.split, self.size, self.seed, self.resolution = split, size, seed, resolution

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for dataset of size {self.size}")
        scene, pixels = _render_item(self.scenes, self.seed, index, self.resolution)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"image": image, "caption": scene.caption}


def heldout_captions(n: int | None = None, seed: int = 0) -> list[str]:
    """Held-out captions: all of them (sorted) if ``n`` is None, otherwise the first
    ``n`` in the order that ``write_image_folder("heldout", n, seed)`` writes them."""
    scenes = _split("heldout")
    if n is None:
        return [sc.caption for sc in scenes]
    return [_scene_for_index(scenes, seed, i).caption for i in range(n)]


def caption_vocabulary() -> list[str]:
    """Every distinct word used in any caption, sorted (for a word-level tokenizer)."""
    return sorted({word for sc in _all_scenes() for word in sc.caption.split()})


def write_image_folder(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int = 0,
    resolution: int = _REFERENCE_RESOLUTION,
    progress: bool = False,
) -> Path:
    """Write ``n`` images as ``00000.png, ...`` plus ``captions.txt`` (one caption per
    line, same order) into ``out_dir``; return the folder. Images match ToyWorldDataset
    items with the same split, seed and resolution."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    scenes = tuple(split_scenes(split))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(n - 1)))
    captions = []
    for i in tqdm(range(n), desc=f"toy {split} images", disable=not progress):
        scene, pixels = _render_item(scenes, seed, i, resolution)
        Image.fromarray(pixels).save(out / f"{i:0{digits}d}.png")
        captions.append(scene.caption)
    (out / "captions.txt").write_text("\n".join(captions) + "\n")
    return out
