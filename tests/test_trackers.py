"""Experiment tracking through accelerate's trackers: TensorBoard by default, wandb (offline here) as an option;
scalars every log interval and the preview grids."""

import pytest

from pixsig_distill.train import run


def test_tensorboard_gets_the_scalars_and_the_preview_grid(compose_train, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(compose_train(out_dir=tmp_path / "tb"))
    [folder] = [p for p in (tmp_path / "tb" / "tensorboard").iterdir() if p.is_dir()]
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"loss_dm", "loss_fake", "samples_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss_dm")] == [2, 4]  # train.log_every=2
    assert "samples" in events.Tags()["images"]  # the step-4 preview grid


def test_wandb_offline_run_and_no_tracker(compose_train, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    summary = run(compose_train("train.log_with=[wandb]", out_dir=tmp_path / "wb"))
    assert summary["finished"]
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert not (tmp_path / "wb" / "tensorboard").exists()
    run(compose_train("train.log_with=[]", out_dir=tmp_path / "none"))
    assert not (tmp_path / "none" / "tensorboard").exists() and not (tmp_path / "none" / "wandb").exists()
