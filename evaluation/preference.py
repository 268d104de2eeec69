"""Human-preference scorers through their own pip packages (`pip install "pixsig-distill[preference]"`).

* `HPSv2Scorer`: HPS v2.1 (`hpsv2.score(images, prompt, hps_version="v2.1")`), higher is preferred.
* `ImageRewardScorer`: ImageReward-v1.0 (`ImageReward.load(name).score(prompt, images)`).

Both download their weights on first use; without the package or offline, building the scorer
fails with one line that says which, before any image is generated.
"""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pixsig_distill.errors import UserError

from .scorer import Column, Scorer, ScoringContext


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the {package} scorer needs its package: pip install {package} (or pip install "
                        f"'pixsig-distill[preference]'), or leave it out of metrics=") from None


@contextlib.contextmanager
def _loading(what: str):
    """Any failure while the weights load → one line that says what and why."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{what} weights could not be loaded (they download on first use; offline here?): {first}; "
                        f"run once with internet, or leave it out of metrics=") from None


class _PreferenceScorer(Scorer):
    def _per_image(self, images, prompts) -> np.ndarray:
        return np.array([self._one(Image.fromarray(np.asarray(images[i])), prompts[i])
                         for i in tqdm(range(len(images)), desc=self.name, disable=not self.context.progress)])

    def score(self, images, prompts: list[str]) -> dict:
        values = self._per_image(images, prompts)
        return {**self.mean_with_interval(self.name, values), "paired": {self.name: values}}


class HPSv2Scorer(_PreferenceScorer):
    name = "hpsv2"
    columns = (Column("hpsv2", "HPSv2", digits=4, better="higher"),)

    def __init__(self, context: ScoringContext, version: str = "v2.1"):
        super().__init__(context)
        self.version = version
        self.hpsv2 = _import("hpsv2", "hpsv2")
        with _loading(f"HPS {version}"):  # score one blank image now: the weights load before generation starts
            self._one(Image.new("RGB", (64, 64)), "a test")

    def _one(self, image, prompt) -> float:
        return float(np.ravel(self.hpsv2.score([image], prompt, hps_version=self.version))[0])

    def settings(self) -> dict:
        return {"package": "hpsv2", "version": self.version, "resamples": self.context.resamples}

    def models(self) -> dict[str, str]:
        return {f"HPS {self.version}": f"hpsv2:{self.version}"}


class ImageRewardScorer(_PreferenceScorer):
    name = "image_reward"
    columns = (Column("image_reward", "ImageReward", digits=3, better="higher"),)

    def __init__(self, context: ScoringContext, model: str = "ImageReward-v1.0"):
        super().__init__(context)
        self.model_name = model
        module = _import("ImageReward", "image-reward")
        with _loading(model):
            self.model = module.load(model, device=context.device)

    def _one(self, image, prompt) -> float:
        return float(np.ravel(self.model.score(prompt, [image]))[0])

    def settings(self) -> dict:
        return {"package": "image-reward", "model": self.model_name, "resamples": self.context.resamples}

    def models(self) -> dict[str, str]:
        return {self.model_name: f"image-reward:{self.model_name}"}
