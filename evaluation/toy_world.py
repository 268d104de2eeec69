"""The toy world's plug-ins for the evaluation stack (selected by conf/eval/toy*.yaml with `_target_`).

They score with the toy package's own readers (pixsig_distill/toy/); the evaluation stack depends on the toy
world, never the other way round.

* `heldout_prompt_set` / `purple_prompt_set`: held-out captions with their rendered images as the FID reference,
  and fresh renders of the same captions for the ceiling row and the diversity reference;
* `AttributeScorer`: the rule-based attribute read-back (toy/attributes.py); `LearnedAttributeScorer`: the second,
  independent reader (a small CNN, toy/reader.py); "beats the teacher" needs both;
* `CaptionAccuracyScorer`: the toy CLIP's top-1 pick of each image's caption among 10 held-out captions (saturates
  near 100 % for every good sampler; the attribute accuracy is the sharper test);
* `ColourScorer`: on the extension's purple captions, how often the object reads as its caption's colour;
* `ToyEncoderFeatures` (pixsig_distill/toy/encoder.py): features for FID and CMMD from an encoder no training
  objective reads; `ToyFIDFeatures` (pixsig_distill/toy/features.py): toy-CLIP features, which the toy-CLIP reward
  shares (a reward row's toy-CLIP columns are marked "not independent").
"""

from __future__ import annotations

import numpy as np
import torch

from pixsig_distill.identity import weights_identity
from pixsig_distill.toy.attributes import ATTRIBUTES, attribute_hits, scenes_by_caption
from pixsig_distill.toy.clip import WEIGHTS_DIR as CLIP_WEIGHTS_DIR
from pixsig_distill.toy.clip import caption_accuracy_hits, heldout_images, load_toy_clip
from pixsig_distill.toy.extension import EXTENDED_COLOURS, extension_scenes, render
from pixsig_distill.toy.reader import HEADS, WEIGHTS_DIR, load_reader, reader_hits

from .prompts import PromptSet
from .scorer import Column, Scorer, ScoringContext

HELDOUT_SEED = 1  # the held-out stream that every toy figure uses


class ToyPromptSet(PromptSet):
    def _render(self, prompts: list[str], stream: int, draw: int) -> np.ndarray:
        scenes = scenes_by_caption()
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


def purple_prompt_set(n: int | None = 500) -> ToyPromptSet:
    """Held-out purple captions and their rendered images (the FID reference), for conf/eval/toy_purple.yaml."""
    real, captions = render(extension_scenes("heldout"), n or 500, seed=1)
    return ToyPromptSet(captions, "toy_purple_heldout", real)


class AttributeScorer(Scorer):
    """Per-attribute and all-correct accuracy under the rule-based reader (the leaderboard column is all-correct)."""

    name = "attributes"
    columns = (Column("attr_all", "attributes all-correct", digits=3),)

    def __init__(self, context, palette: str = "world"):
        super().__init__(context)
        if palette not in ("world", "extended"):
            raise ValueError(f"palette={palette!r}; use world or extended")
        self.palette = palette

    def score(self, images, prompts: list[str]) -> dict:
        hits = attribute_hits(images, prompts, EXTENDED_COLOURS if self.palette == "extended" else None)
        result = self.mean_with_interval("attr_all", hits.all(axis=1))
        result.update({f"attr_{a}": float(hits[:, k].mean()) for k, a in enumerate(ATTRIBUTES)})
        result["paired"] = {"attr_all": hits.all(axis=1)}
        return result

    def settings(self) -> dict:
        return {"method": "rule-based read-back (pixsig_distill/toy/attributes.py)", "attributes": list(ATTRIBUTES),
                "palette": self.palette, "resamples": self.context.resamples}


class LearnedAttributeScorer(Scorer):
    """All-correct accuracy under the learned reader (the second reader of the leaderboard)."""

    name = "attributes_learned"
    columns = (Column("attr_all_learned", "attributes all-correct (learned reader)", digits=3),)

    def __init__(self, context, weights: str = str(WEIGHTS_DIR)):
        super().__init__(context)
        self.model, self.weights = load_reader(str(weights)), str(weights)

    def score(self, images, prompts: list[str]) -> dict:
        hits = reader_hits(images, prompts, self.model)
        result = self.mean_with_interval("attr_all_learned", hits.all(axis=1))
        result.update({f"attr_{a}_learned": float(hits[:, k].mean()) for k, a in enumerate(HEADS)})
        result["paired"] = {"attr_all_learned": hits.all(axis=1)}
        return result

    def settings(self) -> dict:
        return {"method": "a small CNN per attribute, trained on training-split renders (pixsig_distill/toy/reader.py,"
                          " scripts/train_toy_reader.py)", "resamples": self.context.resamples}

    def models(self) -> dict[str, str]:
        return {"toy reader": weights_identity(self.weights)}


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

    def models(self) -> dict[str, str]:
        return {"toy-CLIP": weights_identity(CLIP_WEIGHTS_DIR)}


class ColourScorer(Scorer):
    """Share of images whose object reads as its caption's colour, from the extended palette: on purple captions,
    how often a model renders the new colour."""

    name = "colour"
    columns = (Column("colour_acc", "colour correct", digits=3),)

    def score(self, images, prompts: list[str]) -> dict:
        return self.mean_with_interval("colour_acc", attribute_hits(images, prompts, EXTENDED_COLOURS)[:, 1])

    def settings(self) -> dict:
        return {"method": "rule-based colour read-back, palette = the world's 7 colours + purple",
                "resamples": self.context.resamples}
