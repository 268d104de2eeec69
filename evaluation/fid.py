"""FID through clean-fid (default) or torchmetrics, on toy-CLIP or Inception features.

FID depends on the library, the resize, the feature network and the sample counts, so every
result names them: `{"fid", "library", "mode", "resize", "features", "n_real", "n_fake", ...}`.

* `library="clean-fid"`: images go through clean-fid's own resizer (PIL bicubic on float pixels,
  its "clean" mode) and feature network, then `cleanfid.fid.frechet_distance` on (mu, sigma).
* `library="torchmetrics"`: uint8 images go to `torchmetrics.image.fid.FrechetInceptionDistance`
  (its network resizes inside), which accumulates and computes the distance itself.

`features` is a feature network object: `InceptionFeatures()` (here; the standard 2048-d
Inception-v3 pool features, whose weights both libraries download on first use, offline a
one-line UserError) or any object with the same methods, selected in config with `_target_`
(the toy world's is `pixsig_distill.toy.features.ToyFIDFeatures`).

`FIDScorer` is the `Scorer` the evaluation runs: FID against the prompt set's real images, with a
bootstrap interval over the generated images (the real statistics stay fixed). Each resample
needs Tr((Σ_r Σ_g)^½) = Σ √λ_i(A Σ_g A), A = Σ_r^½ (the two products share their eigenvalues), so
A is computed once and every resample is one symmetric eigendecomposition.

The real set's (mu, sigma) are computed once and cached as safetensors under `cache_dir`, keyed
by a hash of the real pixels and the feature settings; later calls with the same real set only
featurise the generated images.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pixsig_distill.errors import UserError

from .scorer import Column, Scorer, ScoringContext, bootstrap_interval

LIBRARIES = ("clean-fid", "torchmetrics")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pixsig-distill" / "fid-stats"


def _offline_error(what: str, err: Exception) -> UserError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return UserError(f"{what} could not be loaded (weights download on first use; no internet here?): {first}; "
                     f"run once where there is internet, or use eval=toy")


class InceptionFeatures:
    """The standard FID features: Inception-v3 pool3, 2048-d, at 299 px."""

    name = "inception"

    def settings(self, library: str) -> dict:
        if library == "clean-fid":
            return {"resize": "PIL bicubic on float pixels to 299x299 (clean-fid clean mode)",
                    "features_description": "Inception-v3 pool3, 2048-d (clean-fid torchscript, TF FID weights)"}
        return {"resize": "TF1-compatible bilinear to 299x299 inside torch-fidelity's Inception",
                "features_description": "Inception-v3 pool3, 2048-d (torch-fidelity)"}

    def clean_fid(self, device):
        """(resize fn on HWC uint8 → HWC float32, network on NCHW 0..255 floats → (B, D))."""
        from cleanfid.features import build_feature_extractor
        from cleanfid.resize import build_resizer

        try:
            return build_resizer("clean"), build_feature_extractor("clean", device, use_dataparallel=False)
        except Exception as err:  # urllib errors when offline
            raise _offline_error("clean-fid's Inception network", err) from None

    def torchmetrics(self, device):
        """What `FrechetInceptionDistance(feature=...)` takes."""
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise UserError("torchmetrics' Inception FID needs torch-fidelity; pip install torch-fidelity "
                            "(or use fid.library=clean-fid)")
        return 2048

    def fingerprint(self) -> bytes:
        return b"inception"

    def models(self) -> dict[str, str]:
        """What a feature object reads, name -> weights identity (pixsig_distill/identity.py; a hub model: its
        name and tag), so that a board can tell a metric that shares a model with a run's objective."""
        return {"Inception-v3 (FID weights)": "inception-v3-fid"}


class FID:
    """One FID configuration; call `score(real, fake)` with uint8 image sequences (N, H, W, 3)."""

    def __init__(self, library: str = "clean-fid", features=None, device: str | torch.device = "cpu",
                 batch_size: int = 100, cache_dir: str | Path | None = None, progress: bool = True):
        if library not in LIBRARIES:
            raise UserError(f"unknown FID library '{library}'; use one of {', '.join(LIBRARIES)}")
        self.library, self.features = library, features if features is not None else InceptionFeatures()
        self.features_name = self.features.name
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.progress = progress
        self.images_featurised = 0  # counts every image that went through the network (tests read it)
        self._network = None
        self._metric = None
        self._last_real = None  # (real set object, its statistics): hashing 30k images once per run is enough

    # ---- what the numbers mean ---------------------------------------------------------------
    def settings(self) -> dict:
        mode = "clean" if self.library == "clean-fid" else "torchmetrics (uint8 images to the network)"
        return {"library": self.library, "mode": mode, "features": self.features_name,
                **self.features.settings(self.library)}

    # ---- networks ----------------------------------------------------------------------------
    def _clean_fid_network(self):
        if self._network is None:
            self._network = self.features.clean_fid(self.device)
        return self._network

    def _torchmetrics_metric(self):
        if self._metric is None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            feature = self.features.torchmetrics(self.device)
            try:
                # reset() clears real and fake sums; score() puts the cached real statistics back itself.
                self._metric = FrechetInceptionDistance(feature=feature).to(self.device)
            except Exception as err:
                raise _offline_error("torchmetrics' Inception network", err) from None
        return self._metric

    def load(self) -> "FID":
        """Build the feature network now (it is otherwise built on first use)."""
        if self.library == "clean-fid":
            self._clean_fid_network()
        else:
            self._torchmetrics_metric()
        return self

    # ---- statistics --------------------------------------------------------------------------
    def _batches(self, images, desc: str):
        for start in tqdm(range(0, len(images), self.batch_size), desc=desc, disable=not self.progress):
            batch = [images[i] for i in range(start, min(start + self.batch_size, len(images)))]
            self.images_featurised += len(batch)
            yield batch

    @torch.no_grad()
    def _clean_fid_features(self, images, desc: str) -> np.ndarray:
        from cleanfid.fid import get_batch_features

        resize, network = self._clean_fid_network()
        feats = []
        for batch in self._batches(images, desc):
            # As clean-fid's ResizeDataset: resize each image on float pixels, stack as NCHW.
            x = torch.stack([torch.from_numpy(np.ascontiguousarray(resize(im).transpose(2, 0, 1))) for im in batch])
            feats.append(get_batch_features(x, network, self.device))
        return np.concatenate(feats).astype(np.float64)

    @torch.no_grad()
    def _torchmetrics_features(self, images, desc: str) -> np.ndarray:
        network = self._torchmetrics_metric().inception  # what FrechetInceptionDistance.update calls on uint8
        feats = []
        for batch in self._batches(images, desc):
            # Images of different sizes (a real folder) cannot be stacked: feed them one by one.
            groups = [batch] if len({im.shape for im in batch}) == 1 else [[im] for im in batch]
            for group in groups:
                x = torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2).contiguous().to(self.device)
                feats.append(network(x).double().cpu().numpy())
        return np.concatenate(feats)

    def features_of(self, images, desc: str = "FID features") -> np.ndarray:
        """(N, D) float64 features of uint8 images, through the configured library's resize and network."""
        if self.library == "clean-fid":
            return self._clean_fid_features(images, desc)
        return self._torchmetrics_features(images, desc)

    def statistics(self, images, desc: str = "FID features") -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of a set, as clean-fid and torchmetrics compute them (mean, covariance with N − 1)."""
        feats = self.features_of(images, desc)
        return feats.mean(axis=0), np.cov(feats, rowvar=False)

    def cache_key(self, images) -> str:
        """Hash of the pixels, in order, and of everything that shapes the features."""
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode())
        digest.update(self.features.fingerprint())  # e.g. retrained toy CLIP weights → new statistics
        for i in range(len(images)):
            image = np.ascontiguousarray(images[i])
            digest.update(repr(image.shape).encode())
            digest.update(image.tobytes())
        return digest.hexdigest()[:24]

    def real_statistics(self, real) -> tuple[np.ndarray, np.ndarray, int, Path]:
        """(mu, sigma, n, cache file) of the real set: read from the cache, or computed and stored there."""
        from safetensors.numpy import load_file, save_file

        if self._last_real is not None and self._last_real[0] is real:
            return self._last_real[1]
        path = self.cache_dir / f"fid-real-{self.features_name}-{self.library}-{self.cache_key(real)}.safetensors"
        if path.is_file():
            try:
                stats = load_file(str(path))
                self._last_real = (real, (stats["mu"], stats["sigma"], int(stats["n"][0]), path))
                return self._last_real[1]
            except Exception:
                pass  # a corrupt cache file is recomputed, not trusted
        mu, sigma = self.statistics(real, desc="FID features (real)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({"mu": mu, "sigma": sigma, "n": np.array([len(real)], dtype=np.int64)}, str(tmp),
                  metadata={k: str(v) for k, v in self.settings().items()})
        tmp.replace(path)
        self._last_real = (real, (mu, sigma, len(real), path))
        return self._last_real[1]

    # ---- the distance ------------------------------------------------------------------------
    def distance(self, mu_r, sigma_r, mu_f, sigma_f) -> float:
        """The library's own Fréchet distance: ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½)."""
        if self.library == "clean-fid":
            from cleanfid.fid import frechet_distance

            return float(frechet_distance(mu_r, sigma_r, mu_f, sigma_f))
        from torchmetrics.image.fid import _compute_fid

        as_t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        return float(_compute_fid(as_t(mu_r), as_t(sigma_r), as_t(mu_f), as_t(sigma_f)))

    def score(self, real, fake, desc: str = "FID features", resamples: int = 0, confidence: float = 0.95,
              seed: int = 0, keep_features: bool = False) -> dict:
        """FID of `fake` against `real`; with `resamples`, also a percentile-bootstrap interval over `fake`;
        `keep_features`: the fake images' features too (paired comparisons)."""
        if len(fake) < 2 or len(real) < 2:
            raise UserError(f"FID needs at least 2 real and 2 generated images (got {len(real)} and {len(fake)})")
        mu_r, sigma_r, n_real, _ = self.real_statistics(real)
        feats = self.features_of(fake, desc)
        result = {"fid": self.distance(mu_r, sigma_r, feats.mean(axis=0), np.cov(feats, rowvar=False))}
        if resamples:
            lo, hi = bootstrap_interval(len(feats), _resampled_fid(mu_r, sigma_r, feats), resamples, confidence,
                                        seed)
            result.update(fid_lo=max(lo, 0.0), fid_hi=hi)  # recentring can cross 0; a distance cannot
        if keep_features:
            result["fake_features"] = feats
        return {**result, **self.settings(), "n_real": n_real, "n_fake": len(fake)}


def _resampled_fid(mu_r: np.ndarray, sigma_r: np.ndarray, feats: np.ndarray):
    """FID of feats[indices] against fixed real statistics, fast: Tr((Σ_r Σ_g)^½) = Σ √λ(A Σ_g A) with A = Σ_r^½, and
    A Σ_g A = YᵀY / (n − 1) with Y = (f − f̄) A, whose nonzero eigenvalues are those of Y Yᵀ / (n − 1): an n × n
    matrix when there are fewer images than features (a small board's bootstrap), d × d otherwise."""
    w, v = np.linalg.eigh(sigma_r)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_r = float(np.trace(sigma_r))
    feats = np.asarray(feats, dtype=np.float64)
    projected = feats @ root  # row i: f_i A; centring commutes with the product

    def fid(indices: np.ndarray) -> float:
        n = len(indices)
        f, y = feats[indices], projected[indices]
        mu = f.mean(axis=0)
        y = y - y.mean(axis=0)
        eig = np.linalg.eigvalsh((y @ y.T if n < y.shape[1] else y.T @ y) / (n - 1))
        trace_g = float(((f - mu) ** 2).sum()) / (n - 1)  # Tr Σ_g
        return float(((mu_r - mu) ** 2).sum() + trace_r + trace_g - 2 * np.sqrt(np.clip(eig, 0, None)).sum())

    return fid


class FIDScorer(Scorer):
    """FID of a row's images against the prompt set's real images (or `real=FOLDER`)."""

    name = "fid"

    def __init__(self, context: ScoringContext, features=None, library: str = "clean-fid", batch_size: int = 250,
                 real: str | None = None, resamples: int | None = None, name: str = "fid", header: str = "FID"):
        super().__init__(context)
        from .prompts import image_folder

        # Two FIDs on one board (e.g. on features the reward cannot move, and on the toy CLIP's) differ by name.
        self.name, self.columns = name, (Column(name, header, digits=2, better="lower"),)

        self.real = image_folder(real) if real else context.prompt_set.real
        if self.real is None:
            raise UserError(f"prompt set '{context.prompt_set.source}' has no real images; set real=FOLDER of "
                            f"reference images (e.g. COCO val2014) or leave fid out of metrics=")
        cache = Path(context.cache_dir) / "fid_stats" if context.cache_dir else None
        self.fid = FID(library, features, context.device, batch_size, cache, progress=context.progress).load()
        self.resamples = context.resamples if resamples is None else resamples

    def score(self, images, prompts: list[str]) -> dict:
        result = self.fid.score(self.real, images, resamples=self.resamples, confidence=self.context.confidence,
                                seed=self.context.seed, keep_features=True)
        return {**{f"{self.name}{part}": result[f"fid{part}"] for part in ("", "_lo", "_hi") if f"fid{part}" in result},
                "paired": {self.name: result["fake_features"]}}

    def paired_statistic(self, key: str, values: np.ndarray):
        """FID of the images `indices` against the fixed real statistics (values: their features)."""
        mu_r, sigma_r, _, _ = self.fid.real_statistics(self.real)
        return _resampled_fid(mu_r, sigma_r, values)

    def score_real(self, prompt_set) -> dict | None:
        draw = prompt_set.real_draw()
        return None if draw is None else self.score(draw, prompt_set.prompts)

    def settings(self) -> dict:
        return {**self.fid.settings(), "n_real": len(self.real), "bootstrap": "over generated images, real "
                "statistics fixed", "resamples": self.resamples}

    def models(self) -> dict[str, str]:
        return self.fid.features.models()


def compute_fid(real, fake, **kwargs) -> dict:
    """One-shot helper: `FID(**kwargs).score(real, fake)`."""
    return FID(**kwargs).score(real, fake)
