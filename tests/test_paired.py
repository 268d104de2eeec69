"""Comparisons that resolve: paired differences against the teacher (the same prompts and seeds), and CMMD."""

import numpy as np
import pytest

from evaluation.cmmd import SCALE, KernelSums, _kernel, _normalised
from evaluation.report import paired_cell
from evaluation.scorer import Scorer, ScoringContext, bootstrap_interval, paired_difference


class _Mean(Scorer):
    name = "mean"


@pytest.fixture
def scorer():
    return _Mean(ScoringContext(prompt_set=None, resamples=500))


def test_paired_difference_says_better_worse_or_not_resolved(scorer):
    rng = np.random.default_rng(0)
    reference = rng.random(2000) < 0.90  # per-image hits of the teacher
    better = reference | (rng.random(2000) < 0.5)  # fixes half of its misses
    assert paired_difference(scorer, "acc", better, reference, "higher")["acc_verdict"] == "better"
    assert paired_difference(scorer, "acc", reference, better, "higher")["acc_verdict"] == "worse"
    same = paired_difference(scorer, "acc", reference, reference, "higher")
    assert same["acc_diff"] == 0 and same["acc_verdict"] == "not resolved"
    # lower is better (FID-like): a row below the reference by a clear margin is better
    lower = paired_difference(scorer, "x", reference - 0.5, reference.astype(float), "lower")
    assert lower["x_diff"] == pytest.approx(-0.5) and lower["x_verdict"] == "better"


def test_pairing_resolves_what_two_separate_intervals_cannot(scorer):
    """Image for image, a student that fixes 2 % of the teacher's images: the two rows' own intervals overlap, the
    paired one excludes 0."""
    rng = np.random.default_rng(1)
    reference = rng.random(1000) < 0.95
    student = reference.copy()
    student[np.flatnonzero(~reference)[:20]] = True  # 20 of its misses right: +2 points
    own = [bootstrap_interval(1000, lambda i, v=v: float(v[i].mean()), 500) for v in (student, reference)]
    assert own[0][0] < own[1][1]  # the unpaired intervals overlap
    result = paired_difference(scorer, "acc", student, reference, "higher")
    assert result["acc_diff"] == pytest.approx(0.02) and result["acc_diff_lo"] > 0
    assert result["acc_verdict"] == "better"
    assert paired_cell(result, {"key": "acc", "digits": 3}).endswith("better")


def test_cmmd_kernel_sums_are_the_unbiased_estimator_and_resample_without_self_pairs():
    rng = np.random.default_rng(0)
    real, fake = _normalised(rng.normal(size=(60, 8))), _normalised(rng.normal(size=(40, 8)) + 0.5)
    sums = KernelSums(real, fake)
    k_rr, k_ff, k_fr = _kernel(real, real), _kernel(fake, fake), _kernel(fake, real)
    unbiased = ((k_rr.sum() - 60) / (60 * 59) + (k_ff.sum() - 40) / (40 * 39) - 2 * k_fr.mean()) * SCALE
    assert sums(np.arange(40)) == pytest.approx(unbiased)
    # a resample with repeats: the pairs of an image with itself are left out
    indices = np.array([0, 0, 1, 2, 2, 2, 3])
    pairs = [(a, b) for i, a in enumerate(indices) for j, b in enumerate(indices) if i != j and a != b]
    brute = (k_rr.sum() - 60) / (60 * 59) + np.mean([k_ff[a, b] for a, b in pairs]) - 2 * k_fr[indices].mean()
    assert sums(indices) == pytest.approx(brute * SCALE)


def test_cmmd_of_another_real_draw_is_about_zero_and_of_a_shifted_set_positive():
    rng = np.random.default_rng(2)
    real = _normalised(rng.normal(size=(300, 16)))
    other_real = _normalised(rng.normal(size=(300, 16)))
    shifted = _normalised(rng.normal(size=(300, 16)) + 0.3)
    same, different = KernelSums(real, other_real), KernelSums(real, shifted)
    assert abs(same(np.arange(300))) < 0.05 * different(np.arange(300))


def test_training_seeds_are_summarised_as_mean_and_sd_beside_the_resampling_interval():
    from evaluation.report import seeds_section

    column = {"key": "acc", "header": "acc", "digits": 3, "better": "higher", "interval": True}
    rows = [{"name": f"dmd_s{i}", "group": "dmd", "steps": 1, "acc": v, "acc_lo": v - 0.01, "acc_hi": v + 0.01,
             "acc_diff": v - 0.9, "acc_verdict": "better" if v > 0.92 else "not resolved"}
            for i, v in enumerate((0.93, 0.95, 0.91))]
    rows.append({"name": "lonely", "group": "other", "steps": 1, "acc": 0.5})  # one seed: no spread to report
    text = "\n".join(seeds_section(rows, {"columns": [column]}))
    assert "| dmd (1) | 3 | 0.930 ± 0.020 [0.920, 0.940]; Δ 0.030 ± 0.020 (better, better, not resolved) |" in text
    assert "other" not in text
