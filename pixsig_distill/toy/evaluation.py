"""The toy world's plug-ins for the evaluation stack (selected by conf/eval/toy.yaml with `_target_`).

* `heldout_prompt_set`: the held-out captions with their rendered images as the FID reference, and
  fresh renders of the same captions for the ceiling row and the diversity reference;
* `CaptionAccuracyScorer`: the toy CLIP's top-1 pick of each image's caption among 10 held-out
  captions (saturates near 100 % for every good sampler; the attribute accuracy is the sharper test);
* `ToyFIDFeatures` (in `features.py`) and `AttributeScorer` (in `attributes.py`).
"""

from __future__ import annotations

import numpy as np
import torch

from evaluation.prompts import PromptSet
from evaluation.scorer import Column, Scorer, ScoringContext

from .attributes import _scenes_by_caption
from .clip import caption_accuracy_hits, heldout_images, load_toy_clip

HELDOUT_SEED = 1  # the held-out stream that every toy figure uses


class ToyPromptSet(PromptSet):
    def _render(self, prompts: list[str], stream: int, draw: int) -> np.ndarray:
        scenes = _scenes_by_caption()
        return np.stack([scenes[p].render(rng=np.random.default_rng([stream, draw, i])) for i, p in enumerate(prompts)])

    def real_draw(self) -> np.ndarray:
        return self._render(self.prompts, stream=7, draw=1)

    def real_groups(self, prompts: list[str], draw: int = 0) -> np.ndarray:
        return self._render(prompts, stream=11, draw=draw)


def heldout_prompt_set(n: int | None = 1000) -> ToyPromptSet:
    """`n` held-out captions (a stream that repeats captions) and their images."""
    images, captions = heldout_images(n or 1000, seed=HELDOUT_SEED)
    real = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return ToyPromptSet(captions, "toy_heldout", real)


class CaptionAccuracyScorer(Scorer):
    name = "caption_accuracy"
    columns = (Column("caption_acc", "caption acc", digits=3),)

    def __init__(self, context: ScoringContext, candidates: int = 10):
        super().__init__(context)
        self.candidates = candidates
        self.clip, _, self.tokenizer = load_toy_clip(device=context.device)

    def score(self, images, prompts: list[str]) -> dict:
        pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
        hits = caption_accuracy_hits(self.clip, self.tokenizer, pixels, prompts, self.candidates)
        return {**self.mean_with_interval("caption_acc", hits), "paired": {"caption_acc": np.asarray(hits)}}

    def settings(self) -> dict:
        return {"description": f"toy-CLIP top-1 among {self.candidates} held-out captions",
                "resamples": self.context.resamples}
