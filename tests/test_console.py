"""A default run's console: a header, one progress bar and our log lines; third-party chatter only in the log file."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHATTER = ("Loading pipeline components", "Loading weights", "FutureWarning", "deprecated", "Parsing model identifier",
           "open_clip", "were passed to", "You may get unexpected results")


def test_console_shows_our_lines_and_the_log_file_keeps_the_rest(tiny_train_args, tmp_path):
    out = tmp_path / "run"
    args = [*tiny_train_args(out), "distill=dmd2", "distill.timesteps=[999,499]", "distill.gan.real_images.n=8",
            "train.max_steps=2", "eval=toy", "eval.n_samples=4", "eval.batch_size=4",
            "eval.scorers.diversity.prompts=2", "eval.scorers.diversity.seeds=2", "eval.bootstrap.resamples=10"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "pixsig_distill.train", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "pixsig-distill train: DMD2" in console and "student exported to" in console
    assert [word for word in CHATTER if word in console] == []
    bars = {line.split(":")[0].strip() for line in console.replace("\r", "\n").splitlines() if "it/s]" in line}
    assert bars == {"train"}, bars  # one progress bar
    log = (out / "train.log").read_text()
    assert "step 2/2" in log and "evaluated dmd2 (2 steps)" in log
    assert "pixsig_distill" in log and any(word in log for word in CHATTER)  # the chatter is kept, in the file


def test_a_run_in_process_takes_its_log_file_with_it(compose_train, tmp_path):
    """`run(cfg)` twice in one process (a sweep, a notebook): the first run's log file gets none of the second's
    lines, and no handler is left on the root logger."""
    import logging

    from pixsig_distill.train import run

    handlers = list(logging.getLogger().handlers)
    first, second = tmp_path / "first", tmp_path / "second"
    run(compose_train(out_dir=first))
    assert logging.getLogger().handlers == handlers
    run(compose_train(out_dir=second))
    assert f"checkpoint {first / 'checkpoints'}" in (first / "train.log").read_text()
    assert f"checkpoint {second / 'checkpoints'}" in (second / "train.log").read_text()
    assert str(second) not in (first / "train.log").read_text()
