"""What a metric is to the evaluation stack: a `Scorer`, and the bootstrap that puts an interval on it.

A scorer is built from its config (`_target_`) with a `ScoringContext` and then asked, row after
row, for `score(images, prompts) -> dict`. Its `columns` say which keys of that dict the report
shows, how to format them and which way is better, so `report.py` never names a metric. Adding a
metric is its module and an entry under `scorers:` in an eval preset (conf/eval/*.yaml).

Paired comparisons: every row is generated from the same prompts and seeds, so a row can be compared with a
reference row (the teacher) image by image. A scorer that supports it returns, under the key "paired", the
per-item values its column is computed from (per-image hits, cosines, features); `paired_statistic` says how the
column is computed from them (default: their mean; FID and CMMD: the set statistic). `paired_difference` then gives
row − reference with a bootstrap interval that resamples the same indices in both rows.

Intervals: percentile bootstrap over images (Efron & Tibshirani 1993, §13.3): resample the
images with replacement `resamples` times, recompute the statistic, take the 2.5 and 97.5
percentiles, recentred on the full-sample value (shifted by mean(replicates) − value). For a mean
the shift is ~0; FID needs it: a resample holds only ~63 % distinct images, and FID grows as the
sample shrinks, so its raw replicates sit above the full-sample FID (at 16 images, the whole raw
interval did). A column with `interval=True` comes with `<key>_lo` and `<key>_hi`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Column:
    key: str  # the key in score()'s dict (and in leaderboard.json / .csv)
    header: str  # the markdown header
    digits: int = 4
    better: str = "higher"  # "higher" | "lower": the arrow in the header
    interval: bool = True  # score() also returns <key>_lo and <key>_hi

    @property
    def title(self) -> str:
        return f"{self.header} {'↑' if self.better == 'higher' else '↓'}"


class ScoringContext:
    """What every scorer may need: the prompt set (with its real images), where to run, and the bootstrap.

    (A plain class, not a dataclass: Hydra would turn a dataclass argument into a config node.)"""

    def __init__(self, prompt_set, device: str = "cpu", cache_dir: str | None = None, progress: bool = True,
                 resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
        self.prompt_set = prompt_set  # evaluation.prompts.PromptSet
        self.device = device
        self.cache_dir = cache_dir  # for statistics worth keeping between runs (FID's real set)
        self.progress = progress
        self.resamples, self.confidence, self.seed = resamples, confidence, seed


class Scorer:
    """Base class: a name, the columns it adds, and `score(images, prompts) -> dict`.

    `images` is a sequence of (H, W, 3) uint8 arrays (a lazy `ImageFiles` or an array), `prompts` the
    prompt of each image. A scorer that needs images of its own (several seeds per prompt) returns
    those prompts from `own_prompts()`; the evaluation generates them for every row and passes them
    to `score` instead of the main set.
    """

    name: str = "scorer"
    columns: tuple[Column, ...] = ()

    def __init__(self, context: ScoringContext):
        self.context = context

    def own_prompts(self) -> list[str] | None:
        return None

    def score(self, images, prompts: list[str]) -> dict:
        raise NotImplementedError

    def score_real(self, prompt_set) -> dict | None:
        """The scorer's figures on a fresh draw of real images (the ceiling row), or None if there is none."""
        real = prompt_set.real_draw()
        if real is None:
            return None
        own = self.own_prompts()
        if own is None:
            return self.score(real, prompt_set.prompts)
        groups = prompt_set.real_groups(own)
        return None if groups is None else self.score(groups, own)

    def settings(self) -> dict:
        """What the figures mean (library, model, protocol): goes into the report's meta."""
        return {}

    def models(self) -> dict[str, str]:
        """The pretrained models the figures are computed with, name -> weights identity (pixsig_distill/identity.py;
        a hub model: its name and tag). A row whose training objective read one of them (its card's
        `objective_models`) gets this scorer's columns marked "not independent" (evaluate.py)."""
        return {}

    def paired_statistic(self, key: str, values: np.ndarray) -> Callable[[np.ndarray], float]:
        """The column `key` computed from the items `indices` of `values` (what score() put under "paired")."""
        values = np.asarray(values, dtype=np.float64)
        return lambda indices: float(values[indices].mean())

    # ---- helpers for subclasses ----------------------------------------------------------
    def interval(self, n: int, statistic: Callable[[np.ndarray], float]) -> tuple[float, float]:
        return bootstrap_interval(n, statistic, self.context.resamples, self.context.confidence, self.context.seed)

    def mean_with_interval(self, key: str, values: np.ndarray) -> dict:
        values = np.asarray(values, dtype=np.float64)
        lo, hi = self.interval(len(values), lambda idx: float(values[idx].mean()))
        # A mean stays within the values' range (recentring could step out of it, e.g. below 0 % accuracy).
        return {key: float(values.mean()), f"{key}_lo": max(lo, float(values.min())),
                f"{key}_hi": min(hi, float(values.max()))}


VERDICTS = ("better", "worse", "not resolved")


def paired_difference(scorer: Scorer, key: str, values: np.ndarray, reference: np.ndarray, better: str) -> dict:
    """row − reference for column `key`, from the same prompts and seeds: the difference with a paired bootstrap
    interval (the same resampled indices in both rows) and the verdict: "better" or "worse" when the interval
    excludes 0, else "not resolved"."""
    if len(values) != len(reference):
        raise ValueError(f"a paired comparison needs the same items in both rows ({len(values)} vs {len(reference)})")
    row, ref = scorer.paired_statistic(key, values), scorer.paired_statistic(key, reference)
    difference = lambda indices: row(indices) - ref(indices)  # noqa: E731
    context = scorer.context
    resamples = getattr(scorer, "resamples", context.resamples)  # FID on Inception features sets fewer
    lo, hi = bootstrap_interval(len(values), difference, resamples, context.confidence, context.seed)
    value = difference(np.arange(len(values)))
    sign = 1 if better == "higher" else -1
    verdict = ("better" if sign * lo > 0 and sign * hi > 0 else "worse" if sign * lo < 0 and sign * hi < 0
               else "not resolved")
    return {f"{key}_diff": value, f"{key}_diff_lo": lo, f"{key}_diff_hi": hi, f"{key}_verdict": verdict}


def bootstrap_interval(n: int, statistic: Callable[[np.ndarray], float], resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(indices)` over `n` items resampled with replacement, recentred
    on the full-sample value `statistic(arange(n))` (the module docstring says why)."""
    if resamples <= 0 or n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)], dtype=np.float64)
    shift = np.nanmean(values) - statistic(np.arange(n))
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.nanpercentile(values, [tail, 100 - tail]) - shift
    return float(lo), float(hi)


@dataclass
class ScorerSet:
    """The scorers of one evaluation, in config order."""

    scorers: list[Scorer] = field(default_factory=list)
    context: ScoringContext | None = None  # what they were built with (the bootstrap settings the report names)
    _models: dict | None = field(default=None, init=False, repr=False)  # column_models(), computed once

    @property
    def columns(self) -> list[Column]:
        return [column for scorer in self.scorers for column in scorer.columns]

    def settings(self) -> dict:
        self.column_models()
        return {s.name: {**s.settings(), "reads": ", ".join(self._models[id(s)]) or "no pretrained model"}
                for s in self.scorers}

    def column_models(self) -> list[tuple[Column, dict[str, str]]]:
        """Each column with the pretrained models its scorer reads (computed once: identities hash weights)."""
        if self._models is None:
            self._models = {id(s): s.models() for s in self.scorers}
        return [(column, self._models[id(s)]) for s in self.scorers for column in s.columns]
