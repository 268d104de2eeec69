"""Crash safety, proven on real processes: SIGKILL a run at deterministic points (`PIXSIG_FAULT_AFTER`,
see pixsig_distill/faults.py), run the same command again, and get what an uninterrupted run gets.

Also here: one run per output folder (a real second process is refused), the non-finite guard of the
LCM students, offline behaviour of the commands, and that the default toy command never opens a
network connection. (DMD's non-finite guard and in-process resume are in test_dmd.py / test_lcm.py.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image
from safetensors.torch import load_file

import launching
from methods import METHODS, STEP2, cases
from pixsig_distill.checkpoint import list_checkpoints
from pixsig_distill.errors import UserError
from pixsig_distill.loop import RunLock
from pixsig_distill.train import run

REPO = Path(__file__).resolve().parents[1]
TOY_TEACHER = REPO / "pixsig_distill" / "toy" / "weights" / "teacher"
KILLED = -9  # returncode of a process that died of SIGKILL


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same threads as in here
    env.pop("PIXSIG_FAULT_AFTER", None)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def _cli(module: str, args: list[str], cwd: Path, fault: str | None = None, env: dict | None = None,
         forked: bool = False):
    """`python -m module args` in a fresh process (Hydra's own folder kept under cwd). `forked`: a process forked
    from already imported modules (tests/launching.py), where a test is about what the process does, not how it
    starts."""
    args, env = [*args, f"hydra.run.dir={cwd / 'hydra'}"], _env(PIXSIG_FAULT_AFTER=fault, **(env or {}))
    if forked:
        return launching.run_module(module, args, cwd, env)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _one_line_error(result, start: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and lines[-1].startswith(f"error: {start}"), result.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1


def _state(out: Path) -> tuple[list[str], list[str]]:
    ckpt = out / "checkpoints"
    return ([p.name for p in list_checkpoints(ckpt)],
            sorted(p.name for p in ckpt.glob(".tmp-*")) if ckpt.is_dir() else [])


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b.glob("*.safetensors"))  # weights and optimizer states
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-5, msg=f"{name}:{key}")


# ---- training: kill, re-run, compare -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", cases("resume_after_kill"))
def test_killed_training_resumes_to_the_uninterrupted_result(method, compose_train, tiny_train_args, tmp_path,
                                                             capsys):
    """The registry's methods (tests/methods.py), each killed (SIGKILL) where its entry says: in a step after a
    checkpoint (the default: step 3, after checkpoint 2), or while writing checkpoint 4; then rerun to the end."""
    options = METHODS[method].options("resume_after_kill")
    faults = options.get("faults", [("step:3", [STEP2], [])])
    last_in_subprocess = options.get("last_in_subprocess", False)
    args = [*METHODS[method].overrides("resume_after_kill"), "train.deterministic=true"]
    out = tmp_path / "run"
    command = [*tiny_train_args(out), *args]
    for fault, checkpoints, partial in faults:
        result = _cli("pixsig_distill.train", command, tmp_path, fault=fault, forked=True)
        assert result.returncode == KILLED, result.stderr[-3000:]
        assert _state(out) == (checkpoints, partial), fault
        assert not (out / "export").exists() and not (out / "train_summary.json").exists()
        assert (out / ".lock").exists()  # the dead run's lock file is still there, and must not block the next
    if last_in_subprocess:
        result = _cli("pixsig_distill.train", command, tmp_path, forked=True)
        assert result.returncode == 0, result.stderr[-3000:]
        stdout = result.stdout
        summary = json.loads((out / "train_summary.json").read_text())
    else:
        capsys.readouterr()
        summary = run(compose_train(*args, out_dir=out))
        stdout = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoints' / STEP2} (step 2)" in stdout  # the last complete one, not the .tmp
    assert summary["finished"] and summary["step"] == 4
    assert _state(out) == ([STEP2, "step-0000004"], [])  # stale .tmp folders are gone
    assert (out / "export" / "pixsig_student.json").is_file() and not (out / "export.tmp").exists()

    reference = run(compose_train(*args, out_dir=tmp_path / "ref"))  # the same command, never interrupted
    assert reference["step"] == 4
    _assert_same_checkpoint(out / "checkpoints" / "step-0000004", tmp_path / "ref" / "checkpoints" / "step-0000004")


# ---- evaluation: kill the leaderboard mid-generation ---------------------------------------------

def _leaderboard_args(tiny_folder, out: Path) -> list[str]:
    return ["model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
            "model.max_sequence_length=16", "model.resolution=16", f"out_dir={out}", "device=cpu", "n_samples=6",
            "batch_size=2", "teacher_steps=[2]", "latency.enabled=false", "grid.n=4", "progress=false",
            "eval.metrics=[fid,clip]", "eval.real_row=false", "eval.bootstrap.resamples=10"]


@pytest.mark.slow
def test_killed_leaderboard_resumes_and_trusts_no_torn_image(tiny_folder, tmp_path, monkeypatch):
    import pixsig_distill.sampling
    from evaluation.leaderboard import run as leaderboard

    out = tmp_path / "lb"
    result = _cli("evaluation.leaderboard", _leaderboard_args(tiny_folder, out), tmp_path, fault="image:3",
                  forked=True)
    assert result.returncode == KILLED, result.stderr[-3000:]
    assert not (out / "leaderboard.json").exists()
    [cache] = [p for p in (out / "cache").iterdir() if p.is_dir() and p.name.startswith("teacher")]
    # Images 0 and 1 are vouched for; image 2 is on disk, but the process died before its manifest entry.
    assert sorted(json.loads((cache / "manifest-0.json").read_text())) == ["0", "1"]
    assert (cache / "00002.png").is_file()
    (cache / "00001.png").write_bytes((cache / "00001.png").read_bytes()[:60])  # and a torn one, for good measure

    generated = []
    real = pixsig_distill.sampling.generate_images
    monkeypatch.setattr(pixsig_distill.sampling, "generate_images",
                        lambda model, prompts, *a, **k: generated.append(len(prompts)) or real(model, prompts, *a, **k))

    def compose_lb(folder):
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            return compose("leaderboard", overrides=_leaderboard_args(tiny_folder, folder))

    resumed = leaderboard(compose_lb(out))  # the same command again
    assert sum(generated) == 5  # the torn 1, the unvouched 2, and 3..5: nothing else
    reference = leaderboard(compose_lb(tmp_path / "ref"))
    ref_cache = tmp_path / "ref" / "cache" / cache.name
    for i in range(6):
        a = np.asarray(Image.open(cache / f"{i:05d}.png"), dtype=int)
        b = np.asarray(Image.open(ref_cache / f"{i:05d}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1, i
    for got, want in zip(resumed["rows"], reference["rows"]):
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-3) and got["clip"] == pytest.approx(want["clip"], abs=1e-4)


# ---- one run per output folder -------------------------------------------------------------------

def test_second_run_on_a_busy_folder_is_refused(tiny_train_args, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):  # the first run holds the folder ...
        result = _cli("pixsig_distill.train", tiny_train_args(out), tmp_path)  # ... a second process tries it
    _one_line_error(result, f"another run is using '{out}'")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # it wrote nothing there, not even config.yaml


def test_run_lock_is_reentrant_in_one_process_and_released(tmp_path):
    import fcntl

    with RunLock(tmp_path):
        with RunLock(tmp_path):  # train.run and the loop both take it
            pass
        with open(tmp_path / ".lock") as other, pytest.raises(BlockingIOError):  # still held after the inner exit
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / ".lock") as other:  # released
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---- non-finite guard ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lcm", "lcm_lora"])
def test_non_finite_loss_stops_lcm_and_keeps_good_checkpoints(method, compose_train, tmp_path):
    out = tmp_path / "nan"
    overrides = METHODS[method].overrides("resume_after_kill")
    with pytest.raises(UserError, match="became non-finite at step") as err:
        run(compose_train(*overrides, "train.max_steps=40", "train.ckpt_every=1", "distill.optimizer.lr=1e30",
                          "distill.grad_clip=null", out_dir=out))
    kept = list_checkpoints(out / "checkpoints")
    assert kept and f"the last good checkpoint is {kept[-1]}" in str(err.value) and "\n" not in str(err.value)
    for ckpt in kept:  # and what was kept holds finite weights
        for file in ckpt.glob("*.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(str(file)).values()), file
    assert not (out / "export").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """A finite loss can precede an update that breaks the weights: the checkpoint is refused, not written."""
    from accelerate import Accelerator

    from pixsig_distill.run_state import save_state

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")

    class Method:  # the loop's Method protocol, as far as checkpointing goes
        models = {"net": net}
        optimizers = {}

        def checkpoint_modules(self):
            return {"net": net}

    with pytest.raises(UserError, match="the weights of net became non-finite at step 3"):
        save_state(Method(), Accelerator(cpu=True), tmp_path, 3, 2, {})
    assert not (tmp_path / "checkpoints").exists()


# ---- offline and network -------------------------------------------------------------------------

@pytest.mark.parametrize("module,args", [("pixsig_distill.train", ["eval=none"]),
                                         ("pixsig_distill.generate", ["prompt='a red circle'"])])
def test_uncached_hub_model_offline_is_one_line_on_the_command_line(module, args, tmp_path):
    out = tmp_path / "out"
    result = _cli(module, ["model=pixart_sigma_512", f"out_dir={out}", "device=cpu", *args], tmp_path,
                  env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    _one_line_error(result, "hub model 'PixArt-alpha/PixArt-Sigma-XL-2-512-MS' is not in the local cache and the "
                            "hub is offline")
    assert "model.pretrained=" in result.stderr
    assert not any(out.rglob("*.safetensors")) and not any(out.rglob("*.png"))  # nothing written that looks like work


SITECUSTOMIZE = '''\
"""Written by tests/test_faults.py: record, and refuse, every attempt to reach a non-loopback host."""
import os
import socket

LOG = os.environ["PIXSIG_NET_LOG"]
LOCAL = {None, "localhost", "127.0.0.1", "::1", b"localhost", b"127.0.0.1"}


def _record(line):
    with open(LOG, "a") as f:
        f.write(line + "\\n")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _check(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if sock.family != getattr(socket, "AF_UNIX", None) and host not in LOCAL:
        _record(f"connect {address!r}")
        raise OSError("network disabled by tests/test_faults.py")


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in LOCAL:
        _record(f"getaddrinfo {host!r}")
        raise socket.gaierror("network disabled by tests/test_faults.py")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
_record("guard active")
'''


@pytest.mark.slow
@pytest.mark.skipif(not (TOY_TEACHER / "model_index.json").is_file(), reason="the toy teacher is not shipped yet")
def test_default_toy_command_never_touches_the_network(tmp_path):
    """The README's main command (model=toy, data=toy, eval=toy), shrunk to one step, with HF_HUB_OFFLINE unset and
    an empty hub cache: every connect/getaddrinfo to a non-loopback host is recorded and fails."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "network.log"
    out = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(guard), str(REPO)]), "PIXSIG_NET_LOG": str(log),
           "HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_DATASETS_OFFLINE": None,
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": None, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = _cli("pixsig_distill.train", ["distill=dmd", "t_bar=400", f"out_dir={out}", "train.max_steps=1",
                                           "train.batch_size=2", "eval.n_samples=4", "eval.batch_size=4",
                                           "eval.scorers.diversity.prompts=2", "eval.scorers.diversity.seeds=2"],
                  tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert "guard active" in lines  # the guard was loaded ...
    assert [line for line in lines if line != "guard active"] == []  # ... and nothing tried to connect
    assert (out / "export" / "pixsig_student.json").is_file() and (out / "eval.json").is_file()
