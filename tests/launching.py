"""Two training processes as `accelerate launch --config_file CONFIG -m pixsig_distill.train ...` starts them, without
paying for their imports at every launch.

A launched process spends about 10 s of CPU importing torch, diffusers, transformers and DeepSpeed, then trains the
tiny model for a second or two: the suite's 19 launches were a third of its CPU time. So by default `launch`:

* gives each rank the environment that `accelerate launch` itself gives it for that config file (the distributed
  type, the ZeRO stage, the FSDP options, the rank variables): captured once per config and test process, by
  launching a script that only saves its environment, so the YAML → environment translation stays accelerate's;
* forks each rank from a server process that imported the training stack once (multiprocessing's forkserver with a
  preload: a clean single-threaded parent, not the test process and its state), where it runs the `__main__` of
  `pixsig_distill.train`, as `python -m` does;
* takes the other ranks down when one fails, as torchrun does.

`launch(..., real=True)` runs the real command. Each shipped CPU config keeps tests that do, so the launcher path
itself stays covered.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pkgutil
import runpy
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pixsig_distill" / "conf" / "accelerate"
DIGEST_ENV = "PIXSIG_RANK_DIGESTS"  # pixsig_distill.distributed.DIGEST_ENV (not imported: this module stays light)
ENTRY = "pixsig_distill.train"

# What a rank imports on its way to the end of a run, imported once in the fork server. A module left out is imported
# by every rank (slower, not different).
PRELOAD = ["pixsig_distill.train", "pixsig_distill.loop", "pixsig_distill.teacher", "pixsig_distill.data",
           "pixsig_distill.lora", "pixsig_distill.threads", "pixsig_distill.real_images",
           *(f"pixsig_distill.methods.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "pixsig_distill/methods")])),
           "hydra._internal.core_plugins.basic_launcher", "hydra._internal.core_plugins.basic_sweeper",
           "hydra._internal.core_plugins.importlib_resources_config_source", "hydra._internal.logging_config",
           "diffusers.models.transformers.pixart_transformer_2d", "diffusers.models.autoencoders.autoencoder_kl",
           "diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma", "diffusers.guiders",
           "diffusers.schedulers.scheduling_ddpm", "diffusers.schedulers.scheduling_lcm",
           "transformers.models.t5.modeling_t5", "peft", "PIL.PngImagePlugin", "torch.utils.tensorboard",
           "tensorboard.plugins.hparams.api_pb2", "torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict",
           "torch.utils.cpp_extension", "deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage3",
           "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.ops.adam",
           "deepspeed.module_inject.auto_ep_layer", "deepspeed.runtime.superoffload"]
# Set by the launcher for the agent that owns them; a forked rank needs its own rendezvous (rank 0 hosts the store).
AGENT_ONLY = {"TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE", "MASTER_PORT", "PYTHONPATH", "_"}

_rank_environments: dict[Path, list[dict]] = {}


@dataclass
class Launch:
    returncode: int
    log: str  # every rank's stdout and stderr


def free_port() -> str:
    """A free TCP port for the launch's rendezvous (two test workers may launch at once; 29500 would clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(overrides: list[str], cwd: Path, config: Path, real: bool = False, timeout: float = 900,
           **env: str) -> Launch:
    """`accelerate launch --config_file config -m pixsig_distill.train *overrides` in `cwd`, with `env` added."""
    base = {k: v for k, v in os.environ.items() if k != "PIXSIG_FAULT_AFTER"}
    base.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", DIGEST_ENV: "1", **env})
    if real:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--main_process_port", free_port(), "-m", ENTRY, *overrides]
        done = subprocess.run(command, cwd=cwd, env=base, capture_output=True, text=True, timeout=timeout)
        return Launch(done.returncode, done.stdout + done.stderr)

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts (once per test process)
    port, logs = free_port(), []
    ranks = []
    for rank, added in enumerate(rank_environments(config)):
        logs.append(Path(cwd) / f"rank-{rank}-{time.monotonic_ns()}.log")
        rank_env = {**base, **added, "MASTER_PORT": port}
        ranks.append(context.Process(target=_run_rank, args=(rank_env, overrides, logs[-1], str(cwd))))
        ranks[-1].start()
    returncode = _supervise(ranks, timeout)
    log = "".join(path.read_text(errors="replace") for path in logs if path.exists())
    for path in logs:
        path.unlink(missing_ok=True)
    return Launch(returncode, log)


def rank_environments(config: Path) -> list[dict]:
    """What `accelerate launch --config_file config` adds to each rank's environment."""
    config = Path(config).resolve()
    if config not in _rank_environments:
        with tempfile.TemporaryDirectory() as folder:
            save = "import json, os; json.dump(dict(os.environ), open('rank-' + os.environ['RANK'] + '.json', 'w'))"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                                   "--main_process_port", free_port(), "--no_python", sys.executable, "-c", save],
                                  cwd=folder, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-4000:]
            saved = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("rank-*.json"))]
        assert saved, f"{config.name}: the launch started no process"
        _rank_environments[config] = [{k: v for k, v in rank.items() if env.get(k) != v and k not in AGENT_ONLY}
                                      for rank in saved]
    return _rank_environments[config]


def _supervise(ranks: list, timeout: float) -> int:
    """Wait for every rank; the first to fail takes the others down (torchrun's policy). 0 when all succeeded."""
    deadline, pending, failed = time.monotonic() + timeout, list(ranks), 0
    while pending:
        ready = wait([rank.sentinel for rank in pending], timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            for rank in pending:
                rank.kill()
            raise TimeoutError(f"the launch ran past {timeout} s")
        for rank in [r for r in pending if r.sentinel in ready]:
            rank.join()
            pending.remove(rank)
            if rank.exitcode != 0 and not failed:
                failed = rank.exitcode or 1
                for other in pending:
                    other.kill()
    return failed


def _run_rank(env: dict, overrides: list[str], log: Path, cwd: str) -> None:
    """In the forked rank: its environment, output and arguments, then `python -m pixsig_distill.train`'s code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # read once at start-up by a fresh process
    sys.argv = [ENTRY, *overrides]
    try:
        runpy.run_module(ENTRY, run_name="__main__", alter_sys=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
