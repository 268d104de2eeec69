"""FID through clean-fid (default) or torchmetrics, on toy-CLIP or Inception features.

FID depends on the library, the resize, the feature network and the sample counts, so every
result names them: `{"fid", "library", "mode", "resize", "features", "n_real", "n_fake", ...}`.

* `library="clean-fid"`: images go through clean-fid's own resizer (PIL bicubic on float pixels,
  its "clean" mode) and feature network, then `cleanfid.fid.frechet_distance` on (mu, sigma).
* `library="torchmetrics"`: uint8 images go to `torchmetrics.image.fid.FrechetInceptionDistance`
  (its network resizes inside), which accumulates and computes the distance itself.

`features="toy"` is the toy world's `ToyFeatureExtractor` (toy-CLIP image tower, 32 px);
`features="inception"` is the standard 2048-d Inception-v3 pool features, whose weights both
libraries download on first use (offline, that is a one-line UserError).

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

LIBRARIES = ("clean-fid", "torchmetrics")
FEATURES = ("toy", "inception")
TOY_SIZE = 32  # the toy CLIP's input size


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pixsig-distill" / "fid-stats"


def _offline_error(what: str, err: Exception) -> UserError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return UserError(f"{what} could not be loaded (weights download on first use; no internet here?): {first}; "
                     f"run once where there is internet, or use fid.features=toy")


class FID:
    """One FID configuration; call `score(real, fake)` with uint8 image sequences (N, H, W, 3)."""

    def __init__(self, library: str = "clean-fid", features: str = "toy", device: str | torch.device = "cpu",
                 batch_size: int = 100, cache_dir: str | Path | None = None, progress: bool = True):
        if library not in LIBRARIES:
            raise UserError(f"unknown FID library '{library}'; use one of {', '.join(LIBRARIES)}")
        if features not in FEATURES:
            raise UserError(f"unknown FID features '{features}'; use one of {', '.join(FEATURES)}")
        self.library, self.features_name = library, features
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
        toy = self.features_name == "toy"
        if self.library == "clean-fid":
            mode = "clean"
            resize = (f"PIL bicubic on float pixels to {TOY_SIZE}x{TOY_SIZE} (clean-fid resizer; identity at 32 px)"
                      if toy else "PIL bicubic on float pixels to 299x299 (clean-fid clean mode)")
        else:
            mode = "torchmetrics (uint8 images to the network)"
            resize = (f"torch bicubic+antialias to {TOY_SIZE}x{TOY_SIZE} inside ToyFeatureExtractor (identity at 32 px)"
                      if toy else "TF1-compatible bilinear to 299x299 inside torch-fidelity's Inception")
        if toy:
            description = "toy-CLIP image embedding, 128-d, L2-normalised x sqrt(128) (pixsig_distill.toy.features)"
        else:
            description = ("Inception-v3 pool3, 2048-d (clean-fid torchscript, TF FID weights)"
                           if self.library == "clean-fid" else "Inception-v3 pool3, 2048-d (torch-fidelity)")
        return {"library": self.library, "mode": mode, "resize": resize, "features": self.features_name,
                "features_description": description}

    # ---- networks ----------------------------------------------------------------------------
    def _toy_extractor(self, float_max: float):
        from pixsig_distill.toy.features import ToyFeatureExtractor

        return ToyFeatureExtractor(float_max=float_max, device=self.device)

    def _clean_fid_network(self):
        """(resize fn on HWC uint8 → HWC float32, network on NCHW 0..255 floats → (B, D))."""
        if self._network is None:
            from cleanfid.resize import build_resizer, make_resizer

            if self.features_name == "toy":
                resize = make_resizer("PIL", False, "bicubic", (TOY_SIZE, TOY_SIZE))
                network = self._toy_extractor(float_max=255.0)  # clean-fid hands 0..255 floats
            else:
                from cleanfid.features import build_feature_extractor

                resize = build_resizer("clean")
                try:
                    network = build_feature_extractor("clean", self.device, use_dataparallel=False)
                except Exception as err:  # urllib errors when offline
                    raise _offline_error("clean-fid's Inception network", err) from None
            self._network = (resize, network)
        return self._network

    def _torchmetrics_metric(self):
        if self._metric is None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            if self.features_name == "toy":
                feature = self._toy_extractor(float_max=1.0)
            else:
                from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

                if not _TORCH_FIDELITY_AVAILABLE:
                    raise UserError("torchmetrics' Inception FID needs torch-fidelity; pip install torch-fidelity "
                                    "(or use fid.library=clean-fid)")
                feature = 2048
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

    def _torchmetrics_update(self, images, real: bool, desc: str) -> None:
        metric = self._torchmetrics_metric()
        for batch in self._batches(images, desc):
            # Images of different sizes (a real folder) cannot be stacked: feed them one by one.
            groups = [batch] if len({im.shape for im in batch}) == 1 else [[im] for im in batch]
            for group in groups:
                x = torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2).contiguous().to(self.device)
                metric.update(x, real=real)

    def statistics(self, images, desc: str = "FID features") -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of a set, as clean-fid computes them (np.mean, np.cov with N − 1)."""
        if self.library == "clean-fid":
            feats = self._clean_fid_features(images, desc)
            return feats.mean(axis=0), np.cov(feats, rowvar=False)
        metric = self._torchmetrics_metric()
        metric.reset()
        self._torchmetrics_update(images, True, desc)
        n = int(metric.real_features_num_samples)
        mu = metric.real_features_sum / n
        sigma = (metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)  # torchmetrics' own formula
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def cache_key(self, images) -> str:
        """Hash of the pixels, in order, and of everything that shapes the features."""
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode())
        if self.features_name == "toy":  # retrained toy CLIP weights → new statistics
            from pixsig_distill.toy.clip import WEIGHTS_DIR, WEIGHTS_FILE

            digest.update(hashlib.sha256((WEIGHTS_DIR / WEIGHTS_FILE).read_bytes()).digest())
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
    def score(self, real, fake, desc: str = "FID features") -> dict:
        if len(fake) < 2 or len(real) < 2:
            raise UserError(f"FID needs at least 2 real and 2 generated images (got {len(real)} and {len(fake)})")
        mu_r, sigma_r, n_real, _ = self.real_statistics(real)
        if self.library == "clean-fid":
            from cleanfid.fid import frechet_distance

            mu_f, sigma_f = self.statistics(fake, desc)
            fid = float(frechet_distance(mu_r, sigma_r, mu_f, sigma_f))
        else:
            metric = self._torchmetrics_metric()
            metric.reset()
            # Put the cached real statistics back into the metric's running sums (exact in float64).
            mu = torch.as_tensor(mu_r, dtype=torch.float64, device=self.device)
            sigma = torch.as_tensor(sigma_r, dtype=torch.float64, device=self.device)
            metric.real_features_sum = mu * n_real
            metric.real_features_cov_sum = sigma * (n_real - 1) + n_real * torch.outer(mu, mu)
            metric.real_features_num_samples = torch.tensor(n_real, device=self.device)
            self._torchmetrics_update(fake, False, desc)
            fid = float(metric.compute())
        return {"fid": fid, **self.settings(), "n_real": n_real, "n_fake": len(fake)}


def compute_fid(real, fake, **kwargs) -> dict:
    """One-shot helper: `FID(**kwargs).score(real, fake)`."""
    return FID(**kwargs).score(real, fake)
