"""What docs/guarantees.md promises about stopping and resuming a run, each on the tiny DMD run: checkpoint retention,
the time budget, resume=PATH and resume=never, and the stop when every gradient norm of an interval is non-finite."""

import math

import pytest

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
