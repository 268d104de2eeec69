"""A second, learned reader of the toy world's attributes, independent of the rule-based one (attributes.py).

A claim that a student beats its teacher on compositional accuracy should hold under more than one reader. The
rule-based reader measures colours, a mask centroid and template fits; this one is a small convolutional network
with one classification head per attribute (background, colour, shape, size, position), trained on rendered
images of the training split only, with noise, blur and colour jitter so that it reads a generated image rather
than a renderer's exact pixels. It shares no code with the rule-based reader. Its weights ship in
weights/reader/ (safetensors); `scripts/train_toy_reader.py` reproduces them and reports the held-out accuracy,
which must be at least 99 % all-correct on real held-out renders (tests/test_toy_reader.py checks it).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, all_scenes, split_scenes

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "reader"
HEADS = {"background": list(BACKGROUNDS), "colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES),
         "position": list(POSITIONS)}


class AttributeReader(torch.nn.Module):
    """(B, 3, 32, 32) images in [0, 1] → one logit vector per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = torch.nn.Sequential(  # two convolutions at full resolution: a small shape is ~6 px wide
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), torch.nn.GELU(),      # 16 × 16
            torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), torch.nn.GELU(),  # 8 × 8
            torch.nn.Flatten(), torch.nn.Linear(2 * width * 64, 256), torch.nn.GELU())
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(256, len(values)) for name, values in HEADS.items()})
        self.width = width

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        hidden = self.features(images)
        return {name: head(hidden) for name, head in self.heads.items()}


def save_reader(model: AttributeReader, folder: Path, facts: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "reader.safetensors"))
    (folder / "config.json").write_text(json.dumps({"width": model.width, "heads": HEADS, **facts}, indent=1))


@lru_cache(maxsize=2)
def load_reader(folder: str = str(WEIGHTS_DIR)) -> AttributeReader:
    config = json.loads((Path(folder) / "config.json").read_text())
    model = AttributeReader(config["width"])
    model.load_state_dict(load_file(str(Path(folder) / "reader.safetensors")))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def read_batch(model: AttributeReader, images) -> dict[str, list[str]]:
    """Attribute names read from uint8 (N, H, W, 3) images."""
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    logits = model(pixels)
    return {name: [HEADS[name][i] for i in out.argmax(dim=1).tolist()] for name, out in logits.items()}


@lru_cache(maxsize=1)
def _scenes_by_caption() -> dict[str, Scene]:
    return {scene.caption: scene for scene in all_scenes()}


def reader_hits(images, captions: list[str], model: AttributeReader | None = None,
                batch_size: int = 500) -> np.ndarray:
    """(N, 5) booleans: the learned reader's attribute k of image i matches its caption's."""
    model = model or load_reader()
    scenes, rows = _scenes_by_caption(), []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        read = read_batch(model, [images[i] for i in range(start, stop)])
        for j, caption in enumerate(captions[start:stop]):
            rows.append([read[name][j] == getattr(scenes[caption], name) for name in HEADS])
    return np.array(rows, dtype=bool).reshape(-1, len(HEADS))


# ---- training ---------------------------------------------------------------------------------------------
def jitter(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What a generated image may differ by: Gaussian noise, a slight blur, a small colour and brightness shift."""
    b = pixels.shape[0]
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        kernel = torch.tensor([0.25, 0.5, 0.25])
        k2 = (kernel[:, None] * kernel[None]).expand(3, 1, 3, 3)
        pixels[blur] = F.conv2d(F.pad(pixels[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    pixels = pixels * (1 + 0.06 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5))
    pixels = pixels + 0.04 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    pixels = pixels + torch.rand(b, 1, 1, 1, generator=gen) * 0.04 * torch.randn(pixels.shape, generator=gen)
    return pixels.clamp(0, 1)


def render_batch(scenes: list[Scene], rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.render(32, rng) for s in scenes])).permute(0, 3, 1, 2).float() / 255


def train_reader(out: Path = WEIGHTS_DIR, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3,
                 seed: int = 0, log_every: int = 100) -> AttributeReader:
    """Train on training-split renders (fresh jitter every step), cosine learning rate; returns the model."""
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    scenes = split_scenes("train")
    model = AttributeReader()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    index = {name: {v: i for i, v in enumerate(values)} for name, values in HEADS.items()}
    for step in range(1, steps + 1):
        batch = [scenes[i] for i in rng.integers(0, len(scenes), batch_size)]
        logits = model(jitter(render_batch(batch, rng), gen))
        loss = sum(F.cross_entropy(logits[name], torch.tensor([index[name][getattr(s, name)] for s in batch]))
                   for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0:
            print(f"step {step}/{steps}: loss {loss.item():.4f}", flush=True)
    return model.eval().requires_grad_(False)
