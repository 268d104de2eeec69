"""FID features for the toy world: the toy CLIP's image tower instead of Inception.

Inception-v3 features of 32 px images upsampled to 299 px mostly measure upsampling
artefacts, and the Inception weights would need a download. The toy CLIP has seen this
world and nothing else, so its image tower is the natural "Inception" here.

Which embedding: the L2-normalised CLIP image embedding, scaled by sqrt(D) (D = 128) so
that a coordinate has mean square 1 and FIDs are not all tiny decimals (the scale is a
constant: FID values scale by D, rankings do not change). It beat the pre-projection
features (the 128-d class token after ``ln_post``, before ``visual.proj``) on every
check of FID resolution but one (noise: a tie), measured as FID(real, X) divided by
FID(real, other real) -- the sampling noise floor -- with 2,000 held-out images per set:

    X                                   projected   pre-projection
    blur (sigma 0.7)                      3.2x          2.3x
    Gaussian noise (8/255)                1.7x          1.8x
    red channel +0.05                    28.5x         20.8x
    training-split compositions          18.0x         12.8x
    only 30 distinct scenes             917x          558x

``embedding="pre_projection"`` keeps the other choice available for comparison.

Resizing: none for 32 px images; other sizes are resized to 32 px (bicubic with
antialiasing in ``ToyFeatureExtractor``; clean-fid's own PIL bicubic resizer in
``toy_fid_folders``), never to Inception's 299 px.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from cleanfid.fid import compute_fid, frechet_distance
from cleanfid.resize import make_resizer

from pixsig_distill.identity import weights_identity
from pixsig_distill.toy.clip import WEIGHTS_DIR, WEIGHTS_FILE, load_toy_clip, prepare_images


# What to print next to a toy FID so the number says what it is.
FID_DESCRIPTION = "clean-fid frechet_distance on toy-CLIP image embeddings (L2-normalised x sqrt(128)), 32 px, no resize"


class ToyFeatureExtractor(torch.nn.Module):
    """Frozen toy-CLIP image tower as an FID feature extractor: (B, 3, H, W) -> (B, 128) float64.

    Inputs: uint8 in [0, 255], or float with white = ``float_max`` (1.0 as torchmetrics
    passes with ``normalize=True``; clean-fid's loaders pass 0..255 floats, so use 255.0
    there). Works as ``FrechetInceptionDistance(feature=ToyFeatureExtractor())`` (it has the
    ``num_features`` attribute torchmetrics looks for) and as clean-fid's
    ``custom_feat_extractor``. Features are float64 so that the FID statistics that
    torchmetrics accumulates and returns stay in double precision.
    """

    def __init__(
        self,
        weights_dir: str | Path = WEIGHTS_DIR,
        embedding: str = "projected",
        float_max: float = 1.0,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        if embedding not in ("pre_projection", "projected"):
            raise ValueError(f"embedding must be 'pre_projection' or 'projected', got {embedding!r}")
        model, _, _ = load_toy_clip(device=device, weights_dir=weights_dir)
        self.visual = model.visual  # the text tower is not needed
        if embedding == "pre_projection":
            self.num_features = int(self.visual.proj.shape[0])
            self.visual.proj = None  # open_clip's VisionTransformer skips a None projection
        else:
            self.num_features = int(self.visual.proj.shape[1])
            self.scale = float(np.sqrt(self.num_features))
        self.embedding = embedding
        self.float_max = float(float_max)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ToyFeatureExtractor":
        """Always stays in eval mode (a metric calling ``.train()`` must not change features)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.visual.parameters()).device
        if images.dtype == torch.uint8:
            images = images.to(device).float() / 255.0
        else:
            images = images.to(device).float() / self.float_max
        feats = self.visual(prepare_images(self.visual, images))
        if self.embedding == "projected":
            feats = torch.nn.functional.normalize(feats, dim=-1) * self.scale
        return feats.double()


class ToyFIDFeatures:
    """The toy world's FID feature network for `evaluation.fid.FID` (eval=toy selects it with `_target_`)."""

    name = "toy"
    size = 32  # the toy CLIP's input size

    def settings(self, library: str) -> dict:
        resize = (f"PIL bicubic on float pixels to {self.size}x{self.size} (clean-fid resizer; identity at 32 px)"
                  if library == "clean-fid" else
                  f"torch bicubic+antialias to {self.size}x{self.size} inside ToyFeatureExtractor (identity at 32 px)")
        return {"resize": resize, "features_description": "toy-CLIP image embedding, 128-d, L2-normalised x "
                "sqrt(128) (pixsig_distill.toy.features)"}

    def clean_fid(self, device):
        return make_resizer("PIL", False, "bicubic", (self.size, self.size)), \
            ToyFeatureExtractor(float_max=255.0, device=device)  # clean-fid hands 0..255 floats

    def torchmetrics(self, device):
        return ToyFeatureExtractor(float_max=1.0, device=device)

    def fingerprint(self) -> bytes:
        """Retrained toy CLIP weights → new FID statistics."""
        return hashlib.sha256((WEIGHTS_DIR / WEIGHTS_FILE).read_bytes()).digest()

    def models(self) -> dict[str, str]:
        """The toy CLIP, which the toy-CLIP reward also reads (evaluation/evaluate.py marks such columns)."""
        return {"toy-CLIP": weights_identity(WEIGHTS_DIR)}


@lru_cache(maxsize=1)
def default_extractor() -> ToyFeatureExtractor:
    """One shared extractor over the shipped weights (loading takes about a second)."""
    return ToyFeatureExtractor()


def _as_nchw_uint8(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2) if x.shape[-1] == 3 and x.shape[1] != 3 else x


def toy_features(images, extractor: ToyFeatureExtractor | None = None, batch_size: int = 500) -> np.ndarray:
    """(N, D) float64 features of uint8 images, (N, H, W, 3) or (N, 3, H, W)."""
    extractor = extractor if extractor is not None else default_extractor()
    x = _as_nchw_uint8(images)
    return torch.cat([extractor(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).cpu().numpy()


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (clean-fid's formula)."""
    mu1, mu2 = feats1.mean(axis=0), feats2.mean(axis=0)
    sigma1, sigma2 = np.cov(feats1, rowvar=False), np.cov(feats2, rowvar=False)
    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def toy_fid(real_images, fake_images, extractor: ToyFeatureExtractor | None = None) -> float:
    """FID between two sets of uint8 images: clean-fid's ``frechet_distance`` on toy-CLIP
    features. Report it with ``FID_DESCRIPTION`` and the number of samples."""
    return fid_from_features(toy_features(real_images, extractor), toy_features(fake_images, extractor))


def toy_fid_folders(folder1: str | Path, folder2: str | Path, batch_size: int = 256, verbose: bool = False) -> float:
    """FID between two image folders through clean-fid's own ``compute_fid`` loop.

    clean-fid would resize to 299 px for Inception; here its PIL bicubic resizer targets
    the toy CLIP's 32 px instead (a no-op copy for 32 px images). Its loader hands the
    extractor 0..255 floats, hence ``float_max=255``.
    """
    extractor = ToyFeatureExtractor(float_max=255.0)
    size = tuple(extractor.visual.image_size)
    return float(
        compute_fid(
            str(folder1),
            str(folder2),
            mode="clean",
            custom_feat_extractor=extractor,
            custom_fn_resize=make_resizer("PIL", False, "bicubic", (size[1], size[0])),
            batch_size=batch_size,
            device=torch.device("cpu"),
            num_workers=0,
            verbose=verbose,
        )
    )
