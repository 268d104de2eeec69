"""What docs/guarantees.md promises about stopping and resuming a run, each on the tiny DMD run: checkpoint retention,
the time budget, resume=PATH and resume=never, the stop when every gradient norm of an interval is non-finite, and a
learning-rate schedule that a resumed run continues."""

import math

import pytest
import torch

from pixsig_distill.checkpoint import list_checkpoints
from pixsig_distill.errors import UserError
from pixsig_distill.train import run


def names(out):
    return [p.name for p in list_checkpoints(out / "checkpoints")]


def test_retention_budget_and_explicit_resume(compose_train, tmp_path, caplog):
    out = tmp_path / "run"
    # keep_checkpoints=2 with a checkpoint every step: only the newest two stay.
    summary = run(compose_train("train.max_steps=3", "train.ckpt_every=1", "train.keep_checkpoints=2", out_dir=out))
    assert summary["step"] == 3 and names(out) == ["step-0000002", "step-0000003"]

    # A time budget already spent after the first step: a checkpoint, a stop short of max_steps, not finished, and
    # the finished 3-step run's export left as it was.
    card = out / "export" / "pixsig_student.json"
    exported = card.stat().st_mtime_ns
    budget = run(compose_train("train.max_steps=6", "train.time_budget_min=1e-6", "train.keep_checkpoints=5",
                               out_dir=out))
    assert budget["step"] == 4 and not budget["finished"] and "step-0000004" in names(out)
    assert card.stat().st_mtime_ns == exported

    # resume=PATH starts from that checkpoint, not the newest one; the run then finishes and exports.
    caplog.clear()
    explicit = run(compose_train("train.max_steps=6", "train.keep_checkpoints=5",
                                 f"resume={out / 'checkpoints' / 'step-0000002'}", out_dir=out))
    assert explicit["step"] == 6 and explicit["finished"] and card.stat().st_mtime_ns != exported
    assert "step-0000002 at step 2" in caplog.text

    # resume=never starts over in the same folder: step 1 is trained again, and the run ends at max_steps.
    caplog.clear()
    again = run(compose_train("train.max_steps=1", "resume=never", out_dir=out))
    assert again["step"] == 1 and again["finished"] and "resumed from" not in caplog.text


def test_every_gradient_norm_non_finite_in_an_interval_stops_the_run(compose_train, tmp_path, monkeypatch):
    """Non-finite gradient norms at every step of a logging interval (the loss itself finite): the run stops with
    one line at the interval's end instead of training on."""
    import pixsig_distill.methods.common as common

    real_step = common.accumulated_step

    def norm_nan(*args, **kwargs):
        loss, _ = real_step(*args, **kwargs)
        return loss, common.torch.tensor(math.nan)

    monkeypatch.setattr("pixsig_distill.methods.dmd.accumulated_step", norm_nan)
    with pytest.raises(UserError, match="non-finite at every step up to step 2"):
        run(compose_train("train.max_steps=4", "train.log_every=2", out_dir=tmp_path / "nan"))


def test_a_resumed_run_continues_its_learning_rate_schedule_and_its_step_count(compose_train, tmp_path, monkeypatch,
                                                                               caplog):
    """A linear warm-up and decay (train.lr_schedule): the run resumed from its step-2 checkpoint ends with the weights,
    optimizer moments and schedule of the uninterrupted run, bit for bit; every train_step sees the loop's step
    number (draws.step), counted on from the checkpoint."""
    import json
    import shutil

    from safetensors.torch import load_file

    from pixsig_distill.methods.dmd import DMD

    steps_seen = []
    real_step = DMD.train_step

    def recording(self, batch, draws, micro_batches=1):
        steps_seen.append(draws.step)
        return real_step(self, batch, draws, micro_batches)

    monkeypatch.setattr(DMD, "train_step", recording)
    schedule = ["train.lr_schedule.name=linear", "train.lr_schedule.warmup_steps=1", "train.max_steps=4",
                "train.ckpt_every=2", "train.log_every=1", "train.sample_every=100", "train.deterministic=true"]
    straight = run(compose_train(*schedule, out_dir=tmp_path / "straight"))
    assert steps_seen == [0, 1, 2, 3]
    # linear: factor(0) = 0 (the warm-up), then (4 − s)/(4 − 1); the last step (s = 3) trains at a third of the lr
    assert straight["last_logs"]["lr_generator"] == pytest.approx(2e-5 / 3)
    ckpt = tmp_path / "straight" / "checkpoints"
    assert json.loads((ckpt / "step-0000002" / "state.json").read_text())["lr_schedules"]["generator"]["last_epoch"] == 2

    steps_seen.clear()
    resumed_out = tmp_path / "resumed"
    shutil.copytree(ckpt / "step-0000002", resumed_out / "checkpoints" / "step-0000002")
    resumed = run(compose_train(*schedule, out_dir=resumed_out))
    assert "in the checkpoint; using" not in caplog.text  # the saved lr is the step's; the base lr did not change
    assert steps_seen == [2, 3] and resumed["last_logs"] == {**resumed["last_logs"], **{
        k: v for k, v in straight["last_logs"].items() if k.startswith("lr_")}}
    ours, theirs = resumed_out / "checkpoints" / "step-0000004", ckpt / "step-0000004"
    for file in sorted(p.name for p in theirs.glob("*.safetensors")):
        a, b = load_file(str(ours / file)), load_file(str(theirs / file))
        assert all(torch.equal(a[k], b[k]) for k in b), file
    state = [json.loads((folder / "state.json").read_text())["lr_schedules"] for folder in (ours, theirs)]
    assert state[0] == state[1] and state[0]["fake_score"]["last_epoch"] == 4
