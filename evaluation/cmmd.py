"""CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image Generation"):
the maximum mean discrepancy between real and generated images' CLIP image embeddings, with a Gaussian kernel.

    MMD²(X, Y) = E k(x, x') + E k(y, y') − 2 E k(x, y),   k(x, y) = exp(−‖x − y‖² / (2σ²))   (paper eq. 3)

on L2-normalised embeddings, σ = 10, reported × 1000 (the paper's constants). Unlike FID it assumes no normal
distribution of the features, and its estimate is unbiased (paper §4): the within-set means here leave out
the pairs of an image with itself. Lower is better; real images against another draw of real images are ~0.

A bootstrap resample (or a paired comparison, scorer.py) re-weights the generated set's kernel matrix by how often
each image was drawn, so no resample builds a matrix of its own.
"""

from __future__ import annotations

import numpy as np

from .diversity import _features_fn
from .scorer import Column, Scorer, ScoringContext

SIGMA = 10.0   # the paper's bandwidth
SCALE = 1000.0  # the paper's reporting scale


def _normalised(features: np.ndarray) -> np.ndarray:
    return features / np.clip(np.linalg.norm(features, axis=1, keepdims=True), 1e-12, None)


def _kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    squared = (x**2).sum(1)[:, None] + (y**2).sum(1)[None] - 2 * x @ y.T
    return np.exp(-np.clip(squared, 0, None) / (2 * SIGMA**2))


class KernelSums:
    """MMD² of any subset (with repeats) of the generated images against the fixed real set."""

    def __init__(self, real: np.ndarray, fake: np.ndarray):
        k_rr = _kernel(real, real)
        n = len(real)
        self.real_term = (k_rr.sum() - np.trace(k_rr)) / (n * (n - 1))
        self.k_ff = _kernel(fake, fake)
        self.k_fr = _kernel(fake, real).mean(axis=1)  # each generated image's mean kernel with the real set

    def __call__(self, indices: np.ndarray) -> float:
        # A resample as counts w: the pairs of distinct draws sum to wᵀKw − Σ wᵢ² (k(x, x) = 1), leaving out an
        # image paired with itself, the diagonal and its repeats: O(n²) per resample, not O(n²) memory per row.
        w = np.bincount(indices, minlength=len(self.k_ff)).astype(np.float64)
        m, repeats = w.sum(), (w**2).sum()
        fake_term = (w @ self.k_ff @ w - repeats) / max(m * m - repeats, 1.0)
        return float(SCALE * (self.real_term + fake_term - 2 * (w @ self.k_fr) / m))


class CLIPEmbeddings:
    """A CLIP image tower as CMMD's embedding (the paper: ViT-L/14 at 336 px, OpenAI weights), through open_clip
    with its own preprocessing; the weights download on first use (offline: a one-line error)."""

    def __init__(self, model: str = "ViT-L-14-336", pretrained: str = "openai"):
        self.model, self.pretrained = model, pretrained
        self.name = f"open_clip {model} / {pretrained}"

    def models(self) -> dict[str, str]:
        return {self.name: f"open_clip:{self.model}:{self.pretrained}"}

    def torchmetrics(self, device):
        """A network on uint8 (N, 3, H, W) → (N, D), the interface diversity.py and CMMD call."""
        import torch
        from PIL import Image

        from .clip_score import load_clip

        clip, preprocess, _ = load_clip(self.model, self.pretrained, device)

        def network(images: torch.Tensor) -> torch.Tensor:
            pixels = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).cpu().numpy())) for im in images])
            return clip.encode_image(pixels.to(device)).float()

        return network


class CMMDScorer(Scorer):
    """CMMD of a row's images against the prompt set's real images; `features`: an image-embedding object with the
    interface of evaluation/fid.py's feature objects (the toy: toy-CLIP; real models: a CLIP image tower)."""

    name = "cmmd"

    def __init__(self, context: ScoringContext, features, resamples: int | None = None, name: str = "cmmd",
                 header: str = "CMMD"):
        super().__init__(context)
        self.name, self.columns = name, (Column(name, header, digits=3, better="lower"),)
        self.features = features
        if context.prompt_set.real is None:
            from pixsig_distill.errors import UserError

            raise UserError(f"prompt set '{context.prompt_set.source}' has no real images for CMMD; leave cmmd out "
                            f"of metrics=")
        self.features_name = getattr(features, "name", type(features).__name__)
        self.network = _features_fn(features, context.device)
        self.real = self.embed(context.prompt_set.real)
        self.resamples = context.resamples if resamples is None else resamples

    def embed(self, images, batch_size: int = 500) -> np.ndarray:
        """L2-normalised image embeddings (N, D)."""
        parts = [self.network([images[i] for i in range(start, min(start + batch_size, len(images)))])
                 for start in range(0, len(images), batch_size)]
        return _normalised(np.concatenate(parts))

    def score(self, images, prompts: list[str]) -> dict:
        embeddings = self.embed(images)
        sums = KernelSums(self.real, embeddings)
        n = len(images)
        key = self.name
        result = {key: sums(np.arange(n))}
        if self.resamples:
            from .scorer import bootstrap_interval

            result[f"{key}_lo"], result[f"{key}_hi"] = bootstrap_interval(n, sums, self.resamples,
                                                                          self.context.confidence, self.context.seed)
        result["paired"] = {key: embeddings}
        return result

    def paired_statistic(self, key: str, values: np.ndarray):
        return KernelSums(self.real, values)

    def settings(self) -> dict:
        return {"features": self.features_name, "kernel": f"Gaussian, σ = {SIGMA:g}, on L2-normalised embeddings",
                "scale": f"× {SCALE:g} (Jayasumana et al. 2024)", "estimator": "unbiased MMD²",
                "n_real": len(self.real), "resamples": self.resamples}

    def models(self) -> dict[str, str]:
        return self.features.models()
