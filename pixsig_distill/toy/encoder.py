"""An image encoder of the toy world that no training objective reads: FID and CMMD features independent of the
reward.

The toy CLIP's image tower is the toy world's "Inception" (features.py), but it is also what the toy-CLIP reward
differentiates through (reward.py): a reward-guided student moves those features on purpose, so an FID on them is
not independent evidence. This encoder shares no model, no weights and no objective with anything a student trains
on. It is trained self-supervised, with a seed of its own, on renders of the training split only: SimCLR's
contrastive objective (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
NT-Xent, eq. 1): two mildly jittered views of one image are pulled together, every other image in the batch pushed
away. The jitter is what a generated image may differ by (noise, a slight blur, a small colour and brightness shift,
a 1-px shift), so the features keep what makes two images different scenes and drop render noise.

FID features: the trunk's output (before the projection head, as SimCLR §4.2 recommends), L2-normalised × √D so that
a coordinate has mean square 1, like the toy-CLIP features. `scripts/train_toy_encoder.py` reproduces the shipped
weights (weights/encoder/) and measures how well its FID separates distorted images from real ones, beside the
toy CLIP's (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..identity import weights_identity
from .reader import jitter, render_batch
from .world import split_scenes

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "encoder"
WEIGHTS_FILE = "encoder.safetensors"


class ToyImageEncoder(torch.nn.Module):
    """(B, 3, 32, 32) images in [0, 1] → (B, dim) features; `project` adds SimCLR's head (training only)."""

    def __init__(self, width: int = 32, dim: int = 256, projection: int = 128):
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.GELU(),                        # 32 × 32
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), torch.nn.GELU(),      # 16 × 16
            torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), torch.nn.GELU(),  # 8 × 8
            torch.nn.Conv2d(4 * width, 4 * width, 3, stride=2, padding=1), torch.nn.GELU(),  # 4 × 4
            torch.nn.Flatten(), torch.nn.Linear(4 * width * 16, dim))
        self.head = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(dim, dim), torch.nn.GELU(),
                                        torch.nn.Linear(dim, projection))
        self.width, self.dim, self.projection = width, dim, projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
        return self.trunk(images)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self(images)), dim=-1)


def save_encoder(model: ToyImageEncoder, folder: Path, facts: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    config = {"width": model.width, "dim": model.dim, "projection": model.projection, **facts}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")


@lru_cache(maxsize=2)
def load_encoder(folder: str = str(WEIGHTS_DIR)) -> ToyImageEncoder:
    config = json.loads((Path(folder) / "config.json").read_text())
    model = ToyImageEncoder(config["width"], config["dim"], config["projection"])
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
    return model.eval().requires_grad_(False)


# ---- as FID / CMMD / diversity features -------------------------------------------------------------------
class _Extractor(torch.nn.Module):
    """uint8 or float NCHW images (white = `float_max`) → (B, D) float64 features, L2-normalised × √D."""

    def __init__(self, encoder: ToyImageEncoder, float_max: float, device):
        super().__init__()
        self.encoder, self.float_max, self.num_features = encoder.to(device), float(float_max), encoder.dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        scale = 255.0 if images.dtype == torch.uint8 else self.float_max
        feats = self.encoder(images.to(device).float() / scale)
        return (F.normalize(feats, dim=-1) * np.sqrt(self.num_features)).double()


class ToyEncoderFeatures:
    """The independent encoder as a feature network for evaluation.fid.FIDScorer, CMMDScorer and DiversityScorer
    (`features: {_target_: pixsig_distill.toy.encoder.ToyEncoderFeatures}`)."""

    name = "toy_encoder"
    size = 32

    def __init__(self, weights: str = str(WEIGHTS_DIR)):
        self.weights = str(weights)

    def settings(self, library: str) -> dict:
        return {"resize": f"none at 32 px (other sizes: bicubic+antialias to {self.size} px inside the encoder)",
                "features_description": f"self-supervised toy encoder (SimCLR on training-split renders), "
                                        f"{load_encoder(self.weights).dim}-d trunk, L2-normalised x sqrt(D) "
                                        f"(pixsig_distill.toy.encoder)"}

    def clean_fid(self, device):
        from cleanfid.resize import make_resizer

        return make_resizer("PIL", False, "bicubic", (self.size, self.size)), \
            _Extractor(load_encoder(self.weights), 255.0, device)  # clean-fid hands 0..255 floats

    def torchmetrics(self, device):
        return _Extractor(load_encoder(self.weights), 1.0, device)

    def fingerprint(self) -> bytes:
        return hashlib.sha256(weights_identity(Path(self.weights) / WEIGHTS_FILE).encode()).digest()

    def models(self) -> dict[str, str]:
        return {"toy encoder": weights_identity(Path(self.weights) / WEIGHTS_FILE)}


# ---- training ---------------------------------------------------------------------------------------------
def shift(pixels: torch.Tensor, gen: torch.Generator, pixels_max: int = 1) -> torch.Tensor:
    """Each image moved by up to `pixels_max` px in x and y, edges repeated (the world jitters positions by 1.5 px)."""
    b, _, h, w = pixels.shape
    padded = F.pad(pixels, (pixels_max,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * pixels_max + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss (eq. 1): rows 2k and 2k+1 are two views of one image; each view's positive is the other view,
    its negatives every other row; mean cross-entropy over all 2N rows."""
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # an image is not its own positive
    partner = torch.arange(len(z), device=z.device) ^ 1  # 0 <-> 1, 2 <-> 3, ...
    return F.cross_entropy(logits, partner)


def train_encoder(steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, temperature: float = 0.2,
                  seed: int = 17, log_every: int = 100) -> ToyImageEncoder:
    """SimCLR on fresh training-split renders every step, cosine learning rate after a warm-up; returns the model.
    The seed differs from every other shipped model's (the teacher, toy CLIP and reader use 0)."""
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    scenes = split_scenes("train")
    model = ToyImageEncoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    for step in range(1, steps + 1):
        pixels = render_batch([scenes[i] for i in rng.integers(0, len(scenes), batch_size)], rng)
        views = torch.stack([jitter(shift(pixels.clone(), gen), gen) for _ in range(2)], dim=1).flatten(0, 1)
        loss = nt_xent(model.project(views), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0:
            print(f"step {step}/{steps}: loss {loss.item():.4f}", flush=True)
    return model.eval().requires_grad_(False)
