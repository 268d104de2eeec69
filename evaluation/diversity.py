"""Diversity: do several seeds of one prompt give different images? (A collapsed student does not.)

For `prompts` prompts of the set, `seeds` images each, the score is the mean pairwise distance
between the feature vectors of images of the same prompt, averaged over prompts (the intra-prompt
distance of LPIPS-diversity protocols, here on the FID features). `diversity` divides it by the
same figure for real images of the same prompts when the prompt set can draw them (the toy world
can): 1.0 = as diverse as the world, 0 = one image per prompt. Sets without such real images
report `diversity_abs` only. The interval is a bootstrap over prompts.
"""

from __future__ import annotations

import numpy as np
import torch

from .scorer import Column, Scorer, ScoringContext


def _features_fn(features, device):
    """A callable (N, H, W, 3) uint8 → (N, D) float64 from an `evaluation.fid`-style feature object."""
    network = features.torchmetrics(device)  # takes uint8 NCHW
    if isinstance(network, int):  # Inception through torchmetrics: build it as FID does
        from torchmetrics.image.fid import FrechetInceptionDistance

        network = FrechetInceptionDistance(feature=network).inception.to(device)

    @torch.no_grad()
    def fn(images) -> np.ndarray:
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()
        return network(x.to(device)).double().cpu().numpy()

    return fn


def mean_pairwise_distances(features: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Per group: the mean Euclidean distance over its distinct pairs."""
    out = []
    for index in groups:
        f = features[index]
        d = np.sqrt(np.clip(((f[:, None] - f[None]) ** 2).sum(-1), 0, None))
        k = len(index)
        out.append(d.sum() / (k * (k - 1)))
    return np.array(out)


def _groups(prompts: list[str]) -> list[np.ndarray]:
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    return [np.array(v) for v in by_prompt.values() if len(v) > 1]


class DiversityScorer(Scorer):
    name = "diversity"

    def __init__(self, context: ScoringContext, features, prompts: int = 20, seeds: int = 8, name: str = "diversity",
                 header: str = "diversity"):
        super().__init__(context)
        # Two diversities on one board (on two feature sets) differ by name; they share their images (evaluate.py).
        self.name, self.columns = name, (Column(name, header, digits=3, better="higher"),)
        if seeds < 2:
            raise ValueError(f"diversity needs at least 2 seeds per prompt, got {seeds}")
        distinct = list(dict.fromkeys(context.prompt_set.prompts))[:prompts]
        self.prompt_list = [p for p in distinct for _ in range(seeds)]
        self.n_prompts, self.seeds = len(distinct), seeds
        self.features_name = getattr(features, "name", type(features).__name__)
        self.featurise, self.features = _features_fn(features, context.device), features
        real = context.prompt_set.real_groups(self.prompt_list, draw=0)
        self.reference = None if real is None else float(self._distances(real, self.prompt_list).mean())

    def own_prompts(self) -> list[str]:
        return self.prompt_list

    def _distances(self, images, prompts) -> np.ndarray:
        return mean_pairwise_distances(self.featurise(images), _groups(prompts))

    def score(self, images, prompts: list[str]) -> dict:
        per_prompt = self._distances(images, prompts)
        key = self.name
        result = self.mean_with_interval(f"{key}_abs", per_prompt)
        if self.reference:
            result.update({k.replace("_abs", ""): v / self.reference for k, v in result.items()})
        # paired over prompts (the same prompts and seeds in every row)
        result["paired"] = {key: per_prompt / (self.reference or 1.0), f"{key}_abs": per_prompt}
        return result

    def score_real(self, prompt_set) -> dict | None:
        groups = prompt_set.real_groups(self.prompt_list, draw=1)  # another draw than the reference
        return None if groups is None else self.score(groups, self.prompt_list)

    def settings(self) -> dict:
        return {"prompts": self.n_prompts, "seeds_per_prompt": self.seeds, "features": self.features_name,
                "distance": "mean pairwise Euclidean distance between images of one prompt, averaged over prompts",
                "reference": self.reference, "relative_to": "real images of the same prompts" if self.reference
                else None, "resamples": self.context.resamples, "bootstrap": "over prompts"}

    def models(self) -> dict[str, str]:
        return self.features.models()
