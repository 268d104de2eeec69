"""The evaluation harness: FID, CLIP score, latency, prompt sets, the image cache and the leaderboard."""

import json
from pathlib import Path

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

import pixsig_distill.sampling
from evaluation.cache import ImageCache
from evaluation.clip_score import CLIPScorer
from evaluation.fid import FID, InceptionFeatures
from evaluation.latency import summarize, time_runs, time_stages
from evaluation.leaderboard import run as leaderboard
from evaluation.prompts import load_prompt_set
from evaluation.scorer import ScoringContext
from pixsig_distill.errors import UserError
from pixsig_distill.identity import weights_identity
from pixsig_distill.toy.clip import WEIGHTS_DIR, heldout_images
from evaluation.toy_world import heldout_prompt_set
from pixsig_distill.toy.features import ToyFeatureExtractor, ToyFIDFeatures, toy_features, toy_fid_folders

REPO = Path(__file__).resolve().parents[1]
TOY_CLIP = f"local-dir:{WEIGHTS_DIR}"


def toy_fid(library="clean-fid", **kwargs) -> FID:
    return FID(library, ToyFIDFeatures(), progress=False, **kwargs)


@pytest.fixture(scope="module")
def toy_sets():
    """256 held-out toy images (more than the 128 feature dimensions) and a brightened copy."""
    images, captions = heldout_images(256, seed=1)
    real = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    shifted = np.clip(real.astype(int) + 40, 0, 255).astype(np.uint8)
    return real, shifted, captions


# ---- FID ----------------------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero_and_of_a_shifted_set_positive(toy_sets, tmp_path):
    real, shifted, _ = toy_sets
    fid = toy_fid(cache_dir=tmp_path)
    same = fid.score(real, real)
    assert abs(same["fid"]) < 1e-3
    moved = fid.score(real, shifted)
    assert moved["fid"] > 1.0
    assert {"fid", "library", "mode", "resize", "features", "n_real", "n_fake"} <= set(moved)
    assert (moved["library"], moved["mode"], moved["features"], moved["n_real"], moved["n_fake"]) == \
        ("clean-fid", "clean", "toy", 256, 256)


def test_fid_equals_clean_fid_and_torchmetrics(toy_sets, tmp_path):
    real, shifted, _ = toy_sets
    ours = toy_fid(cache_dir=tmp_path).score(real, shifted)["fid"]
    ours_tm = toy_fid("torchmetrics", cache_dir=tmp_path).score(real, shifted)["fid"]
    # clean-fid's own Fréchet distance on the same features ...
    f_real, f_fake = toy_features(real), toy_features(shifted)
    reference = frechet_distance(f_real.mean(0), np.cov(f_real, rowvar=False), f_fake.mean(0),
                                 np.cov(f_fake, rowvar=False))
    # ... clean-fid's whole folder loop (its loader and resizer) ...
    for name, images in (("real", real), ("fake", shifted)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{i:05d}.png")
    folders = toy_fid_folders(tmp_path / "real", tmp_path / "fake")
    # ... and torchmetrics' metric with the toy extractor.
    metric = FrechetInceptionDistance(feature=ToyFeatureExtractor())
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(shifted).permute(0, 3, 1, 2), real=False)
    torchmetrics = float(metric.compute())
    for other in (ours_tm, reference, folders, torchmetrics):
        assert abs(ours - other) <= 1e-3 * abs(other), (ours, other)


@pytest.mark.parametrize("n", [5, 300], ids=["fewer_images_than_features", "more"])
def test_a_bootstrap_resample_is_clean_fids_distance_of_those_images(n):
    """The bootstrap's fast FID (evaluation/fid.py: _resampled_fid; n × n eigenvalues below 128 images) equals
    clean-fid's Fréchet distance of the resampled features, repeats included."""
    from evaluation.fid import _resampled_fid

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(500, 128)), (1.2 * rng.normal(size=(n, 128)) + 0.3).astype(np.float32)
    mu_r, sigma_r = real.mean(0), np.cov(real, rowvar=False)
    indices = rng.integers(0, n, n)
    f = fake[indices].astype(np.float64)
    expected = frechet_distance(mu_r, sigma_r, f.mean(0), np.cov(f, rowvar=False))
    assert _resampled_fid(mu_r, sigma_r, fake)(indices) == pytest.approx(expected, rel=1e-6)


def test_real_statistics_are_cached_on_disk_and_reused(toy_sets, tmp_path):
    real, shifted, _ = toy_sets
    first = toy_fid(cache_dir=tmp_path)
    a = first.score(real[:200], shifted[:50])
    assert first.images_featurised == 250
    stats = list(tmp_path.glob("fid-real-*.safetensors"))
    assert len(stats) == 1
    second = toy_fid(cache_dir=tmp_path)  # a new process would start like this
    b = second.score(real[:200], shifted[:50])
    assert second.images_featurised == 50 and b["fid"] == pytest.approx(a["fid"], rel=1e-9)
    second.score(real[:199], shifted[:50])  # another real set: another key
    assert second.images_featurised == 50 + 199 + 50 and len(list(tmp_path.glob("fid-real-*"))) == 2
    tm = toy_fid("torchmetrics", cache_dir=tmp_path)
    c = tm.score(real[:200], shifted[:50])
    tm.score(real[:200], shifted[:50])
    assert tm.images_featurised == 200 + 50 + 50 and c["fid"] == pytest.approx(a["fid"], rel=1e-3)


def test_inception_and_hub_clip_offline_are_one_line_errors(monkeypatch, tmp_path):
    import urllib.error

    import cleanfid.features
    import open_clip

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cleanfid.features, "build_feature_extractor", offline)
    images = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(UserError, match="Inception network could not be loaded") as err:
        FID(features=InceptionFeatures(), cache_dir=tmp_path, progress=False).score(images, images)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(UserError, match="ViT-g-14") as err:
        CLIPScorer(ScoringContext(None), "ViT-g-14", "laion2b_s34b_b88k")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown FID library"):
        FID(library="pytorch-fid")
    with pytest.raises(UserError, match="unknown open_clip model"):
        CLIPScorer(ScoringContext(None), "ViT-Q-99")
    with pytest.raises(UserError, match="not a weight tag of ViT-g-14"):
        CLIPScorer(ScoringContext(None), "ViT-g-14", "laion9b")


# ---- CLIP score and latency ---------------------------------------------------------------------

def test_clip_score_orders_matched_above_mismatched(toy_sets):
    real, _, captions = toy_sets
    scorer = CLIPScorer(ScoringContext(None, progress=False), TOY_CLIP)
    matched = scorer.cosines(real[:64], captions[:64])
    mismatched = scorer.cosines(real[:64], captions[1:65])
    assert (matched > mismatched).mean() > 0.9 and matched.mean() > mismatched.mean()
    result = scorer.score(real[:64], captions[:64])
    assert result["clip"] == pytest.approx(matched.mean()) and "cosine" in scorer.settings()["scale"]
    assert result["clip_lo"] < result["clip"] < result["clip_hi"]
    assert result["clip_100"] == pytest.approx((100 * np.maximum(matched, 0)).mean())


def test_latency_statistics_on_a_fake_clock():
    ticks, calls, syncs = iter(np.cumsum([0, 1, 0, 2, 0, 3, 0, 4, 0, 10]) / 1000), [], []
    times = time_runs(lambda: calls.append(1), warmup=2, runs=5, sync=lambda: syncs.append(1),
                      clock=lambda: next(ticks))
    assert len(calls) == 7 and len(syncs) == 1 + 2 * 5  # after warm-up, then around every timed run
    assert np.allclose(times, [0.001, 0.002, 0.003, 0.004, 0.010])
    stats = summarize(times)
    assert stats["median"] == pytest.approx(3.0) and stats["runs"] == 5
    assert stats["p90"] == pytest.approx(4 + 0.6 * 6)  # linear between the 4th and 5th of 5 sorted runs
    assert summarize([0.005])["p90"] == pytest.approx(5.0)


def test_stage_times_add_up_to_the_run_they_split():
    ticks = iter(np.arange(0, 100, 1.0))  # every clock read is one second later than the last
    syncs = []

    def three_stages(lap):
        for name in ("text_encoder", "transformer", "vae"):
            lap(name)

    runs = time_stages(three_stages, warmup=1, runs=2, sync=lambda: syncs.append(1), clock=lambda: next(ticks))
    assert len(runs) == 2
    for total, stages in runs:
        assert list(stages) == ["text_encoder", "transformer", "vae"] and all(v == 1.0 for v in stages.values())
        assert total == pytest.approx(sum(stages.values()) + 1)  # the clock read after the last stage's sync
    assert len(syncs) == 1 + 2 * (2 + 3)  # after warm-up; around every run and at every stage's end


# ---- prompt sets and the image cache ------------------------------------------------------------

def test_prompt_sets(tmp_path):
    toy = heldout_prompt_set(5)
    assert len(toy.prompts) == 5 and toy.real.shape == (5, 32, 32, 3) and toy.real.dtype == np.uint8
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\na blue square\n")
    assert load_prompt_set(str(text), 3).prompts == ["a red circle", "a blue square", "a red circle"]
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [{"id": 1, "caption": " A cat. "}, {"id": 2, "caption": "A dog."}]}))
    assert load_prompt_set(str(coco)).prompts == ["A cat.", "A dog."] and load_prompt_set(str(coco)).real is None
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.json").write_text('{"images": []}')
    for bad, message in (("empty.txt", "no prompts"), ("bad.json", "not a COCO caption file"),
                         ("missing.json", "does not exist")):
        with pytest.raises(UserError, match=message):
            load_prompt_set(str(tmp_path / bad))


def test_image_cache_trusts_only_complete_matching_images(tmp_path):
    prompts, seeds = ["a", "b", "c"], [0, 1, 2]
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    cache = ImageCache(tmp_path, {"x": 1})
    cache.put([0, 1, 2], images, prompts, seeds)
    assert cache.done(prompts, seeds) == {0, 1, 2}
    assert np.array_equal(cache.files(3)[2], images[2])
    cache.path(1).write_bytes(cache.path(1).read_bytes()[:40])  # a torn write
    cache.path(2).unlink()
    assert cache.done(prompts, seeds) == {0}
    assert cache.done(["a", "b", "c"], [5, 1, 2]) == set()  # another seed is another image
    assert not list(tmp_path.glob(".*tmp*"))


# ---- the leaderboard ----------------------------------------------------------------------------

def _fake_export(folder: Path, card: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "pixsig_student.json").write_text(json.dumps(card))
    return folder


@pytest.fixture
def compose_leaderboard(tiny_folder, tmp_path):
    def _compose(*overrides):
        base = ["model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
                "model.max_sequence_length=16", "model.resolution=16", f"out_dir={tmp_path / 'lb'}", "device=cpu",
                "n_samples=6", "batch_size=4", "teacher_steps=[2,1]", "latency.warmup=1", "latency.runs=2",
                "grid.n=4", "progress=false", "eval.scorers.diversity.prompts=2", "eval.scorers.diversity.seeds=2",
                "eval.bootstrap.resamples=20"]
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            return compose("leaderboard", overrides=base + list(overrides))
    return _compose


def test_leaderboard_end_to_end_and_resume(compose_train, compose_leaderboard, tmp_path, monkeypatch):
    from pixsig_distill.train import run as train

    train(compose_train(out_dir=tmp_path / "dmd"))
    train(compose_train("distill=lcm", "distill.pair_steps=2", out_dir=tmp_path / "lcm"))
    # A second T̄: the same generator sampled from T̄ = 200 (the card decides where DMD starts).
    other = tmp_path / "dmd200" / "export"
    import shutil

    shutil.copytree(tmp_path / "dmd" / "export", other)
    card = json.loads((other / "pixsig_student.json").read_text())
    # ... and as if trained with a toy-CLIP reward: the columns that read toy-CLIP are not independent for it.
    toy_clip = {"toy-CLIP": weights_identity(WEIGHTS_DIR)}
    (other / "pixsig_student.json").write_text(json.dumps({**card, "t_bar": 200, "timesteps": [200],
                                                           "objective_models": toy_clip}))
    entries = (f"entries=[{{name: dmd_400, method: dmd, path: '{tmp_path / 'dmd' / 'export'}', steps: 1}},"
               f"{{name: dmd_200, method: dmd, path: '{other}'}},"
               f"{{name: lcm, method: lcm, path: '{tmp_path / 'lcm' / 'export'}', steps: [1, 2]}}]")
    cfg = compose_leaderboard(entries, "eval.compare_to.steps=2")  # the reference: the teacher at 2 steps here
    result = leaderboard(cfg)
    out = tmp_path / "lb"
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "grid.png", "tbar_sweep.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "leaderboard.json").read_text())
    real_row, data["rows"] = data["rows"][0], data["rows"][1:]
    assert real_row["kind"] == "real" and real_row["attr_all"] > 0.9 and real_row["fid"] < real_row["fid_hi"]
    assert [(r["name"], r["method"], r["steps"]) for r in data["rows"]] == [
        ("teacher", "teacher", 2), ("teacher", "teacher", 1), ("dmd_400", "dmd", 1), ("dmd_200", "dmd", 1),
        ("lcm", "lcm", 1), ("lcm", "lcm", 2)]
    for row in data["rows"]:
        assert {"name", "method", "steps", "fid", "fid_lo", "fid_hi", "clip", "clip_lo", "clip_hi", "attr_all",
                "caption_acc", "diversity", "latency_ms", "n_samples"} <= set(row)
        assert row["fid"] > 0 and -1 <= row["clip"] <= 1 and row["n_samples"] == 6
        assert row["fid_lo"] <= row["fid"] <= row["fid_hi"] and row["clip_lo"] <= row["clip"] <= row["clip_hi"]
        assert row["latency_ms"]["p90"] >= row["latency_ms"]["median"] > 0
        assert row["latency_transformer_ms"]["median"] > 0
    assert [r["timesteps"] for r in data["rows"][2:4]] == [[400], [200]]
    meta = data["meta"]
    assert meta["scorers"]["fid"]["library"] == "clean-fid" and meta["scorers"]["fid"]["n_real"] == 6
    assert "cosine" in meta["scorers"]["clip"]["scale"] and meta["latency"]["batch_size"] == 1
    assert meta["bootstrap"]["resamples"] == 20 and [c["key"] for c in meta["columns"]] == [
        "fid_encoder", "cmmd_encoder", "fid", "cmmd", "clip", "attr_all", "attr_all_learned", "caption_acc",
        "diversity_encoder", "diversity"]
    # Which model each column reads, and which rows share one with their training objective.
    assert meta["scorers"]["fid_encoder"]["reads"] == "toy encoder" and meta["scorers"]["fid"]["reads"] == "toy-CLIP"
    assert meta["scorers"]["attributes"]["reads"] == "no pretrained model"
    assert data["rows"][3]["not_independent"] == {key: ["toy-CLIP"] for key in ("fid", "cmmd", "clip", "caption_acc",
                                                                                "diversity")}
    assert not any(r["not_independent"] for r in data["rows"] if r["name"] != "dmd_200")
    # paired against the teacher (2 steps): every other generated row, every column, with a verdict
    assert "compared_to" not in data["rows"][0] and meta["compare_to"] == {"name": "teacher", "steps": 2}
    for row in data["rows"][1:]:
        assert row["compared_to"] == "teacher (2 steps)"
        for key in ("fid_encoder", "cmmd_encoder", "fid", "cmmd", "clip", "attr_all", "attr_all_learned",
                    "caption_acc", "diversity_encoder", "diversity"):
            assert row[f"{key}_diff_lo"] <= row[f"{key}_diff"] <= row[f"{key}_diff_hi"], key
            assert row[f"{key}_verdict"] in ("better", "worse", "not resolved")
    assert set(meta["versions"]) >= {"torch", "diffusers", "transformers"} and meta["date"] and meta["device"]
    assert meta["paper_table_1"]["rows"][-1]["fid"] == 9.273
    markdown = (out / "leaderboard.md").read_text()
    assert "not comparable in absolute terms" in markdown and "| dmd_200 | dmd | 1 | 200 |" in markdown
    assert "intervals do not resolve" in markdown and "95 % intervals" in markdown
    assert "## Against teacher (2 steps), image for image" in markdown and "| dmd_200 (1) | " in markdown
    assert "**not independent**" in markdown and "dmd_200 (1): toy-CLIP" in markdown
    assert markdown.count(" †") == 2 * 5  # dmd_200's five toy-CLIP columns, in the board and in the paired table
    assert (out / "leaderboard.csv").read_text().count("\n") == 8 and "fid_lo" in (out / "leaderboard.csv").read_text()
    assert Image.open(out / "grid.png").size[1] > Image.open(out / "grid.png").size[0] / 2  # 7 rows of 4
    assert len(list((out / "cache").glob("*-s0-*/0000[0-5].png"))) == 6 * 6
    # 2 prompts x 2 seeds, shared by the two diversity columns
    assert len(list((out / "cache").glob("*-own-*/0000[0-3].png"))) == 6 * 4

    # Resume: nothing is generated again and the real FID statistics are read back, not recomputed.
    generated = []
    real_generate = pixsig_distill.sampling.generate_images
    monkeypatch.setattr(pixsig_distill.sampling, "generate_images",
                        lambda model, prompts, *a, **k: generated.append(len(prompts)) or real_generate(model, prompts,
                                                                                                         *a, **k))
    featurised = []
    real_stats = FID.statistics
    monkeypatch.setattr(FID, "statistics", lambda self, images, desc="": featurised.append(desc) or
                        real_stats(self, images, desc))
    again = leaderboard(compose_leaderboard(entries, "latency.enabled=false"))
    assert generated == [] and not any("real" in d for d in featurised)
    assert [r["fid"] for r in again["rows"]] == pytest.approx([r["fid"] for r in result["rows"]])
    # A stopped run: two images of one row missing, one torn → exactly those three are generated.
    folder = out / "cache" / data["rows"][2]["cache"]
    (folder / "00004.png").unlink()
    (folder / "00005.png").unlink()
    (folder / "00001.png").write_bytes(b"\x89PNG")
    leaderboard(compose_leaderboard(entries, "latency.enabled=false"))
    assert sum(generated) == 3


@pytest.mark.parametrize("overrides,message", [
    (["entries=[{name: x, path: /tmp}]"], "not a student export"),
    (["eval.metrics=[fid, sharpness]"], "no scorer named 'sharpness'"),
    (["entries=[{name: x, method: dmd, path: /nonexistent/export, steps: 1}]"], "does not exist"),
    (["entries=[{name: x, method: dmd}]"], "no path"),
    (["teacher_steps=[0]"], "steps=0"),
    (["teacher_steps=[-2]"], "steps=-2"),
    (["n_samples=0"], "n_samples=0"),
    (["teacher_steps=[]"], "nothing to evaluate"),
    (["eval.scorers.fid.library=pytorch-fid"], "unknown FID library"),
])
def test_leaderboard_bad_input(compose_leaderboard, overrides, message):
    with pytest.raises(UserError, match=message):
        leaderboard(compose_leaderboard(*overrides))


def test_leaderboard_bad_student_steps_and_prompt_files(compose_leaderboard, tmp_path):
    dmd = _fake_export(tmp_path / "dmd", {"method": "dmd", "t_bar": 400, "num_inference_steps": 1, "timesteps": [400]})
    lcm = _fake_export(tmp_path / "lcm", {"method": "lcm", "num_inference_steps": 4, "original_inference_steps": 50})
    (tmp_path / "empty.txt").write_text("")
    cases = [
        ([f"entries=[{{name: x, method: dmd, path: '{dmd}', steps: 2}}]"], "use steps=1"),
        ([f"entries=[{{name: x, method: lcm, path: '{dmd}', steps: 1}}]"], "holds a dmd student"),
        ([f"entries=[{{name: x, method: lcm, path: '{lcm}', steps: [1, 0]}}]"], "steps=0"),
        ([f"entries=[{{name: x, method: lcm, path: '{lcm}', steps: 64}}]"], "50-step grid"),
        ([f"entries=[{{name: teacher, method: lcm, path: '{lcm}', steps: 2}}]"], "two rows are named 'teacher'"),
        ([f"prompts={tmp_path / 'empty.txt'}"], "no prompts"),
        ([f"prompts={tmp_path / 'p.txt'}"], "does not exist"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            leaderboard(compose_leaderboard(*overrides))
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(UserError, match="real=FOLDER"):
        leaderboard(compose_leaderboard(f"prompts={tmp_path / 'p.txt'}"))


def test_leaderboard_command_bad_input_is_one_line_exit_2(tmp_path):
    """A real process (not forked, tests/launching.py): nothing the evaluation stack prints while importing reaches
    the console either."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "evaluation.leaderboard", f"hydra.run.dir={tmp_path}",
                           "entries=[{name: x, method: dmd, path: /nonexistent/export}]"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: entry 'x'") and "does not exist" in lines[0]


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "pixsig_distill" / "toy" / "weights" / "teacher" /
                         "model_index.json").is_file(), reason="the toy teacher is not shipped yet")
def test_leaderboard_default_config_on_the_toy_teacher(tmp_path):
    """The documented command's config (model=toy, toy prompts, toy FID/CLIP), shrunk to a few images."""
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("leaderboard", overrides=[f"out_dir={tmp_path}", "device=cpu", "n_samples=4", "batch_size=4",
                                                "teacher_steps=[1]", "latency.warmup=0", "latency.runs=1",
                                                "progress=false"])
    result = leaderboard(cfg)
    assert result["rows"][1]["fid"] > 0 and result["meta"]["scorers"]["fid"]["features"] == "toy"


def test_toy_board_names_the_default_training_folders(tmp_path, monkeypatch):
    """board=toy lists the students of the documented training commands; an untrained one is a one-line error."""
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("leaderboard", overrides=["board=toy", f"out_dir={tmp_path}"])
        train_cfg = compose("train", overrides=["t_bar=600"])
    entries = {e.name: e for e in cfg.entries}
    assert {e.method for e in entries.values()} == {"teacher", "dmd", "dmd2", "lcm", "lcm_lora"}
    assert list(entries["lcm"].steps) == [1, 2, 4] and cfg.teacher_steps[0] == 20
    assert sorted(int(n.removeprefix("dmd_tbar")) for n in entries if n.startswith("dmd_")) == [200, 400, 600, 800, 999]
    assert entries["dmd2_4step"].path == "outputs/train/dmd2_toy/distill.timesteps=[999,749,499,249]/export"
    # the entry's path is where `python -m pixsig_distill.train distill=dmd t_bar=600` exports
    run_dir = OmegaConf.to_container(train_cfg)["out_dir"]  # unresolved: filled in by Hydra at run time
    assert run_dir == "outputs/${hydra:job.name}/${hydra:runtime.choices.distill}_${hydra:runtime.choices.model}/" \
                      "${hydra:job.override_dirname}"
    assert entries["dmd_tbar600"].path == "outputs/train/dmd_toy/t_bar=600/export"
    monkeypatch.chdir(tmp_path)  # a folder where nothing was trained
    with pytest.raises(UserError, match="does not exist"):
        leaderboard(cfg)
