"""Processes the tests start as `accelerate launch --config_file CONFIG -m pixsig_distill.train ...` (or `python -m`)
starts them, without paying for their imports every time.

A launched process spends about 10 s of CPU importing torch, diffusers, transformers and DeepSpeed, then trains the
tiny model for a second or two: the suite's 19 launches took over a third of its CPU time. So by default `launch`:

* gives each rank the environment that `accelerate launch` itself gives it for that config file (the distributed
  type, the ZeRO stage, the FSDP options, the rank variables): captured once per config and test process, by
  launching a script that only saves its environment, so the YAML → environment translation stays accelerate's;
* forks each rank from a server process that imported the training stack once (multiprocessing's forkserver with a
  preload: a clean single-threaded parent, not the test process and its state), where it runs the `__main__` of
  `pixsig_distill.train`, as `python -m` does (`run_module` does the same for one process of any command);
* takes the other ranks down when one fails, as torchrun does.

`launch(..., real=True)` runs the real command. One test for each of the launcher's paths does: DDP's (which FSDP2
takes too) and DeepSpeed's (ZeRO-2; ZeRO-3 differs in the config's settings, which every forked rank gets).
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

from pixsig_distill.distributed import DIGEST_ENV

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "pixsig_distill.train"

# What a forked command imports on its way to the end of a run, imported once in the fork server. A module left out is
# imported by every forked process (slower, not different).
PRELOAD = ["pixsig_distill.train", "evaluation.leaderboard", "pixsig_distill.generate", "pixsig_distill.cache_text",
           "pixsig_distill.make_pairs", "pixsig_distill.merge_lora", "pixsig_distill.plan",
           "pixsig_distill.toy.make_images", "pixsig_distill.loop", "pixsig_distill.teacher",
           "pixsig_distill.data", "pixsig_distill.lora", "pixsig_distill.threads", "pixsig_distill.real_images",
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

_rank_environments: dict[tuple, list[dict]] = {}


@dataclass
class Launch:
    returncode: int
    log: str  # every rank's stdout and stderr


def free_port() -> str:
    """A free TCP port for the launch's rendezvous (two test workers may launch at once; 29500 would clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(overrides: list[str], cwd: Path, config: Path, real: bool = False, timeout: float = 900, nodes: int = 1,
           **env: str) -> Launch:
    """`accelerate launch --config_file config -m pixsig_distill.train *overrides` in `cwd`, with `env` added;
    `nodes` > 1: a job of that many machines with one process each (`rank_environments`), forked."""
    base = {k: v for k, v in os.environ.items() if k != "PIXSIG_FAULT_AFTER"}
    base.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", DIGEST_ENV: "1", **env})
    if real:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--main_process_port", free_port(), "-m", ENTRY, *overrides]
        done = subprocess.run(command, cwd=cwd, env=base, capture_output=True, text=True, timeout=timeout)
        return Launch(done.returncode, done.stdout + done.stderr)

    port = free_port()
    ranks = [_start(ENTRY, overrides, {**base, **added, "MASTER_PORT": port}, cwd)
             for added in rank_environments(config, nodes)]
    returncode = _supervise([process for process, _, _ in ranks], timeout)
    return Launch(returncode, "".join(_collect(out) + _collect(err) for _, out, err in ranks))


def run_module(module: str, args: list[str], cwd: Path, env: dict, timeout: float = 600):
    """`python -m module *args` with exactly `env`, forked from the preloaded server: a process of its own (it can be
    killed, it holds its own locks) without the imports. Not for what happens at start-up: the server imported
    everything with the test process's environment (HF_HUB_OFFLINE, say, is read at import)."""
    process, out, err = _start(module, args, env, cwd)
    returncode = _supervise([process], timeout)
    return subprocess.CompletedProcess([module, *args], returncode, _collect(out), _collect(err))


def python_m(module: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    """`python -m module *args` in `cwd` as a test runs a command whose start-up is not what it tests (its errors,
    its files): forked (`run_module`), with the test process's environment and `env` on top. The command's imports
    and sys.path are the server's; the environment reaches what the command reads at run time and the processes
    it starts (which get the repository on PYTHONPATH)."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return run_module(module, list(args), Path(cwd or os.getcwd()), full, timeout)


def _start(module: str, args: list[str], env: dict, cwd: Path):
    """A process forked from the server, running `module` as `python -m` does; its stdout and stderr go to files."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts (once per test process)
    stem = Path(tempfile.gettempdir()) / f"pixsig-forked-{os.getpid()}-{time.monotonic_ns()}"
    out, err = stem.with_suffix(".out"), stem.with_suffix(".err")
    process = context.Process(target=_run_module, args=(module, args, env, str(cwd), out, err))
    process.start()
    return process, out, err


def _collect(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    path.unlink(missing_ok=True)
    return text


def rank_environments(config: Path, nodes: int = 1) -> list[dict]:
    """What `accelerate launch --config_file config` adds to each rank's environment. `nodes` > 1: a job of that
    many machines with one process each, as a multi-node job starts it: one launch per machine, all at once, each
    with its machine rank and the first one's rendezvous (`--num_machines`, `--machine_rank`, `--main_process_ip`
    on localhost)."""
    config = Path(config).resolve()
    if (config, nodes) not in _rank_environments:
        with tempfile.TemporaryDirectory() as folder:
            save = "import json, os; json.dump(dict(os.environ), open('rank-' + os.environ['RANK'] + '.json', 'w'))"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            port = free_port()
            machines = [[] if nodes == 1 else ["--num_machines", str(nodes), "--num_processes", str(nodes),
                                               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
                        for rank in range(nodes)]
            launches = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                          str(config), "--main_process_port", port, *machine, "--no_python",
                                          sys.executable, "-c", save], cwd=folder, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True) for machine in machines]
            for done in launches:
                _, err = done.communicate(timeout=300)
                assert done.returncode == 0, err[-4000:]
            saved = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("rank-*.json"))]
        assert saved, f"{config.name}: the launch started no process"
        _rank_environments[(config, nodes)] = [{k: v for k, v in rank.items() if env.get(k) != v and
                                                k not in AGENT_ONLY} for rank in saved]
    return _rank_environments[(config, nodes)]


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


def _run_module(module: str, args: list[str], env: dict, cwd: str, out: Path, err: Path) -> None:
    """In the forked process: its environment, output and arguments, then `python -m module`'s code."""
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import torch

    if env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # read once at start-up by a fresh process
    sys.argv = [module, *args]
    sys.modules.pop(module, None)  # as under `python -m`: the preloaded copy is not the one that runs as __main__
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
