"""The scorers of the evaluation stack: bootstrap intervals, attribute accuracy, diversity, preference scorers,
the real-benchmark presets (offline, with tiny stand-ins), and the rule that generic code never switches on the
toy world."""

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from evaluation.diversity import DiversityScorer
from evaluation.fid import FID
from evaluation.prompts import PromptSet, coco_captions, mjhq
from evaluation.scorer import ScoringContext, bootstrap_interval
from pixsig_distill.errors import UserError
from evaluation.toy_world import AttributeScorer
from pixsig_distill.toy.attributes import ATTRIBUTES, attribute_hits, read_attributes
from evaluation.toy_world import heldout_prompt_set
from pixsig_distill.toy.features import ToyFIDFeatures
from pixsig_distill.toy.world import all_scenes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    return heldout_prompt_set(400)


# ---- bootstrap ----------------------------------------------------------------------------------

def test_bootstrap_interval_contains_the_value_and_shrinks_with_n():
    values = np.random.default_rng(0).normal(size=4000)
    widths = []
    for n in (50, 400, 4000):
        sample = values[:n]
        lo, hi = bootstrap_interval(n, lambda idx: float(sample[idx].mean()), resamples=400)
        assert lo < sample.mean() < hi
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # ~1/sqrt(n): 50 → 400 → 4000
    assert widths[1] == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.25)  # the normal-theory width


def test_fid_interval_contains_the_value_and_shrinks_with_n(toy, tmp_path):
    fid = FID(features=ToyFIDFeatures(), cache_dir=tmp_path, progress=False)
    fake = np.clip(toy.real_draw().astype(int) + 25, 0, 255).astype(np.uint8)  # a visibly shifted set
    widths = []
    for n in (50, 400):
        result = fid.score(toy.real, fake[:n], resamples=200)
        assert result["fid_lo"] <= result["fid"] <= result["fid_hi"]
        widths.append(result["fid_hi"] - result["fid_lo"])
    assert widths[0] > 1.5 * widths[1]


def test_the_independent_encoders_fid_sees_what_fid_should_and_reads_no_model_a_run_trains_with(toy, tmp_path):
    """The shipped encoder's FID (toy/encoder.py) puts another draw of real images near 0, and images of too few
    scenes or with a colour cast far above it; it shares no model with the toy-CLIP reward."""
    from pixsig_distill.toy.encoder import ToyEncoderFeatures
    from pixsig_distill.toy.reward import ToyCLIPReward

    features = ToyEncoderFeatures()
    fid = FID(features=features, cache_dir=tmp_path, progress=False)
    real = toy.real_draw()
    floor = fid.score(toy.real, real)["fid"]
    few = np.stack([toy.real[i % 20] for i in range(len(real))])  # 20 distinct images, repeated
    red = real.astype(int)
    red[..., 0] += 13  # the red channel +0.05
    assert fid.score(toy.real, few)["fid"] > 10 * floor
    assert fid.score(toy.real, np.clip(red, 0, 255).astype(np.uint8))["fid"] > 2 * floor
    reward = ToyCLIPReward().objective_models()
    assert reward == ToyFIDFeatures().models()  # the reward reads what the toy-CLIP columns read ...
    assert set(features.models().values()).isdisjoint(reward.values())  # ... and nothing this encoder is


# ---- attribute accuracy -------------------------------------------------------------------------

def test_attributes_read_back_from_real_images(toy):
    hits = attribute_hits(toy.real_draw(), toy.prompts)
    assert hits.all(axis=1).mean() >= 0.9 and hits.mean(axis=0).min() >= 0.95


def test_attributes_of_wrong_images_score_low(toy):
    # Each image paired with another caption: all-correct needs all five attributes to coincide by chance.
    shifted = toy.prompts[1:] + toy.prompts[:1]
    hits = attribute_hits(toy.real_draw(), shifted)
    assert hits.all(axis=1).mean() < 0.05
    # Flat images (no object) and noise read back wrong too.
    flat = np.full((20, 32, 32, 3), 120, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    for images in (flat, noise):
        assert attribute_hits(images, toy.prompts[:20]).all(axis=1).mean() < 0.1


def test_one_attribute_changed_is_caught():
    scene = all_scenes()[100]
    image = scene.render(rng=np.random.default_rng(0))
    assert read_attributes(image) == {a: getattr(scene, a) for a in ATTRIBUTES}
    bigger = type(scene)(**{**scene.__dict__, "size": "large" if scene.size != "large" else "small"})
    assert not attribute_hits(image[None], [bigger.caption])[0, ATTRIBUTES.index("size")]


def test_attribute_scorer_reports_each_attribute_and_an_interval(toy):
    scorer = AttributeScorer(ScoringContext(toy, resamples=400))
    # half the images under another image's caption: all-correct ≈ 0.5, and the interval has the binomial width
    images, prompts = toy.real_draw()[:200], list(toy.prompts[:200])
    prompts[::2] = prompts[1::2]
    result = scorer.score(images, prompts)
    assert {f"attr_{a}" for a in ATTRIBUTES} | {"attr_all", "attr_all_lo", "attr_all_hi"} <= set(result)
    p = result["attr_all"]
    assert 0.4 < p < 0.65
    width = result["attr_all_hi"] - result["attr_all_lo"]
    assert width == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 200), rel=0.25)


# ---- diversity ----------------------------------------------------------------------------------

def test_diversity_of_identical_images_is_zero_and_of_real_images_about_one(toy):
    scorer = DiversityScorer(ScoringContext(toy, resamples=50), ToyFIDFeatures(), prompts=6, seeds=4)
    prompts = scorer.own_prompts()
    assert len(prompts) == 24 and len(set(prompts)) == 6
    one_per_prompt = {p: toy.real_groups([p])[0] for p in set(prompts)}
    collapsed = scorer.score(np.stack([one_per_prompt[p] for p in prompts]), prompts)
    assert collapsed["diversity"] == 0 and collapsed["diversity_abs"] == 0
    real = scorer.score_real(toy)  # another draw of real images
    assert 0.6 < real["diversity"] < 1.6 and real["diversity_lo"] < real["diversity"] < real["diversity_hi"]
    assert real["diversity_hi"] - real["diversity_lo"] < 0.5 * real["diversity"]  # 6 prompts still resolve it
    noise = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    assert scorer.score(noise, prompts)["diversity"] > real["diversity"]


def test_diversity_without_real_groups_reports_the_absolute_figure():
    prompt_set = PromptSet(["a", "b"], "plain")
    scorer = DiversityScorer(ScoringContext(prompt_set, resamples=10), ToyFIDFeatures(), prompts=2, seeds=2)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    result = scorer.score(images, scorer.own_prompts())
    assert result["diversity_abs"] > 0 and "diversity" not in result


# ---- preference scorers: their packages, offline -----------------------------------------------

def test_preference_scorers_fail_in_one_line_without_their_package(monkeypatch):
    from evaluation.preference import HPSv2Scorer, ImageRewardScorer

    monkeypatch.setitem(sys.modules, "hpsv2", None)  # import hpsv2 → ImportError
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    for cls, package in ((HPSv2Scorer, "hpsv2"), (ImageRewardScorer, "image-reward")):
        with pytest.raises(UserError, match=f"pip install {package}") as err:
            cls(ScoringContext(None))
        assert "\n" not in str(err.value)


def test_preference_scorers_through_stand_in_packages(monkeypatch, toy):
    from evaluation.preference import HPSv2Scorer, ImageRewardScorer

    brightness = lambda image: float(np.asarray(image).mean()) / 255  # noqa: E731
    hps = types.ModuleType("hpsv2")
    hps.score = lambda images, prompt, hps_version: [brightness(images[0])]
    reward = types.ModuleType("ImageReward")

    class Model:
        def score(self, prompt, images):
            return brightness(images[0]) * len(prompt)

    reward.load = lambda name, device: Model()
    monkeypatch.setitem(sys.modules, "hpsv2", hps)
    monkeypatch.setitem(sys.modules, "ImageReward", reward)
    images = toy.real_draw()[:10]
    expected = np.mean([brightness(im) for im in images])
    assert HPSv2Scorer(ScoringContext(toy, progress=False)).score(images, toy.prompts[:10])["hpsv2"] == \
        pytest.approx(expected)
    assert "image_reward_lo" in ImageRewardScorer(ScoringContext(toy, progress=False)).score(images, ["ab"] * 10)

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    hps.score = offline
    with pytest.raises(UserError, match="HPS v2.1 weights could not be loaded"):
        HPSv2Scorer(ScoringContext(toy))


# ---- real-benchmark presets, offline with tiny stand-ins ----------------------------------------

def _tiny_coco(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "val2014"
    images.mkdir()
    annotations, files = [], []
    for i, scene in enumerate(all_scenes()[:12]):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(scene.render(rng=np.random.default_rng(i))).save(images / name, quality=95)
        files.append({"id": i, "file_name": name})
        annotations += [{"image_id": i, "id": 2 * i, "caption": scene.caption},
                        {"image_id": i, "id": 2 * i + 1, "caption": "another caption of the same image"}]
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"images": files, "annotations": annotations}))
    return captions, images


def test_coco_protocol_takes_one_caption_per_image_with_a_fixed_seed(tmp_path):
    captions, images = _tiny_coco(tmp_path)
    a, b = coco_captions(captions, 8, str(images)), coco_captions(captions, 8, str(images))
    assert a.prompts == b.prompts and len(set(a.prompts)) == 8 and "another caption" not in " ".join(a.prompts)
    assert len(a.real) == 8 and a.real[0].shape == (32, 32, 3)
    assert coco_captions(captions, 8, seed=1).prompts != a.prompts
    with pytest.raises(UserError, match="lacks the images"):
        coco_captions(captions, 8, str(tmp_path))


def test_mjhq_folder_layout(tmp_path):
    meta = {}
    for i, scene in enumerate(all_scenes()[:6]):
        category = "people" if i % 2 else "animals"
        meta[f"id{i}"] = {"prompt": scene.caption, "category": category}
        (tmp_path / "mjhq30k_imgs" / category).mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.render()).save(tmp_path / "mjhq30k_imgs" / category / f"id{i}.jpg")
    (tmp_path / "meta_data.json").write_text(json.dumps(meta))
    people = mjhq(tmp_path, category="people")
    assert len(people.prompts) == 3 and len(people.real) == 3
    with pytest.raises(UserError, match="not an MJHQ-30K folder"):
        mjhq(tmp_path / "mjhq30k_imgs")


def test_coco_board_runs_offline_with_stand_in_networks(tiny_folder, tmp_path):
    """board=coco2014_30k as written, with the Inception and ViT-g-14 swapped for the toy world's networks."""
    from evaluation.leaderboard import run as leaderboard

    captions, images = _tiny_coco(tmp_path)
    toy_clip = f"local-dir:{REPO / 'pixsig_distill' / 'toy' / 'weights' / 'clip'}"
    overrides = ["board=coco2014_30k", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
                 "model.max_sequence_length=16", "model.resolution=16", f"eval.prompts.path={captions}",
                 f"eval.prompts.images={images}", "n_samples=6", "batch_size=6", "teacher_steps=[1]",
                 "eval.scorers.fid.features._target_=pixsig_distill.toy.features.ToyFIDFeatures",
                 f"eval.scorers.clip.model={toy_clip}", "eval.scorers.clip.pretrained=null",
                 "eval.scorers.cmmd.features._target_=pixsig_distill.toy.features.ToyFIDFeatures",
                 "~eval.scorers.cmmd.features.model", "~eval.scorers.cmmd.features.pretrained",
                 "eval.bootstrap.resamples=20", "eval.seed_sets=2", "latency.enabled=false", f"out_dir={tmp_path / 'lb'}",
                 "device=cpu", "progress=false"]
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("leaderboard", overrides=overrides)
    assert cfg.eval.scorers.fid.resamples == 100 and cfg.eval.metrics == ["fid", "cmmd", "clip"]
    result = leaderboard(cfg)
    [row] = result["rows"]  # no real row: COCO has no second draw
    assert row["fid_lo"] <= row["fid"] <= row["fid_hi"] and len(row["fid_seeds"]) == 2 and row["fid_seed_std"] >= 0
    assert row["cmmd_lo"] <= row["cmmd"] <= row["cmmd_hi"] and len(row["cmmd_seeds"]) == 2
    assert "COCO" in result["meta"]["prompts"] and result["meta"]["scorers"]["fid"]["n_real"] == 6
    assert "±" in (tmp_path / "lb" / "leaderboard.md").read_text()


# ---- the toy world plugs in from below ----------------------------------------------------------

def test_generic_code_never_switches_on_the_toy_world():
    pattern = re.compile(r"""(==|!=|\bin\b)\s*\(?["']toy|["']toy["']\s*(==|!=)""")
    offenders = []
    for path in [*(REPO / "pixsig_distill").rglob("*.py"), *(REPO / "evaluation").rglob("*.py")]:
        if "toy" in path.relative_to(REPO).parts[1:-1] or path.parent.name == "toy":
            continue
        offenders += [f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                      if pattern.search(line)]
    assert offenders == []
