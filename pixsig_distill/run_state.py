"""A run's state, saved and restored in one place: what a resumed run needs to go on as if never stopped.

`save_state` writes a checkpoint (checkpoint.py: safetensors, atomic) of every module the method checkpoints (the
trained networks, gathered when sharded, with DeepSpeed's fp32 masters in place of its bf16 copies; their EMAs),
every optimizer's state (AdamW's moments, gathered from FSDP2 shards or ZeRO partitions, keyed by parameter name),
the loop's counters (the step; the learning-rate schedules' state) and the run's fingerprint.

`restore_state` reads one back around `method.prepare`: the weights go into the plain networks before accelerate
wraps or shards them; after it, the masters into DeepSpeed's engines and the moments into the optimizers (FSDP2
swaps the parameters an optimizer holds), with the learning rates of the command that resumes.

Random numbers need no state: every step's draws and batch come from (seed, step) (loop.py, draws.py), so a
resumed run replays exactly what the uninterrupted one would have drawn. distributed.py keeps what differs between
engines (gathering, scattering, masters); checkpoint.py the file format.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import (keep_configured_hyperparameters, list_checkpoints, load_checkpoint, read_optimizer_states,
                         save_checkpoint)
from .distributed import (check_same_step, load_optimizer_states, model_state_dicts, optimizer_state_dicts,
                          restore_master_weights, resumable_optimizers, write_rank_digest)
from .errors import UserError

log = logging.getLogger(__name__)


def save_state(method, accelerator, out_dir: Path, step: int, keep: int, extra: dict) -> None:
    """A checkpoint of the run at `step` (collective: every process calls it); `extra`: what the loop records with
    it (the fingerprint, the learning-rate schedules). Weights that are not finite are never saved: the run stops."""
    accelerator.wait_for_everyone()
    models = model_state_dicts(method, accelerator)  # on every process: gathering sharded weights is collective
    # A finite loss can still be followed by an update that blew the weights up: never save those.
    # (Every process checks: the weights are the same on all, so all stop together.)
    broken = [name for name, sd in models.items()
              if any(v.is_floating_point() and not torch.isfinite(v).all() for v in sd.values())]
    if broken:
        stop_non_finite(f"the weights of {', '.join(broken)}", step, out_dir)
    write_rank_digest(out_dir, step, accelerator, models)  # test hook (PIXSIG_RANK_DIGESTS=1), off otherwise
    optimizers = optimizer_state_dicts(method, accelerator)  # collective too
    if accelerator.is_main_process:
        path = save_checkpoint(Path(out_dir) / "checkpoints", step, models, optimizers,
                               {"optimizer_states": bool(optimizers), **extra}, keep)
        log.info("checkpoint %s", path)
    accelerator.wait_for_everyone()


def restore_state(path: Path | None, method, accelerator, out_dir: Path) -> dict:
    """`method` prepared on `accelerator` and, given a checkpoint `path`, holding its weights, masters and optimizer
    moments. Returns the checkpoint's state (`step`, `lr_schedules`, ...), or {"step": 0} for a fresh start."""
    state = {"step": 0}
    if path is not None:  # weights into the plain networks, before accelerate wraps or shards them
        state = load_checkpoint(path, method.checkpoint_modules())
        accelerator.print(f"resuming from {path} (step {state['step']})")
        log.info("resumed from %s at step %d", path, state["step"])
    check_same_step(accelerator, state["step"], out_dir)  # several processes: all from the same checkpoint
    method.prepare(accelerator)
    if path is not None:
        restore_master_weights(path, method, accelerator)
        _restore_optimizers(path, method, accelerator)
    return state


def _restore_optimizers(path: Path, method, accelerator) -> None:
    """After `prepare` (FSDP2 swaps the parameters an optimizer holds): the saved moments, the configured lr."""
    names = resumable_optimizers(path, method, accelerator)
    configured = {name: [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                  for name, opt in method.optimizers.items()}
    load_optimizer_states(read_optimizer_states(path, names), method, accelerator)
    for name in names:
        keep_configured_hyperparameters(name, method.optimizers[name], configured[name])


def stop_non_finite(what: str, step: int, out_dir: Path, remedy: str = ""):
    """Stop the run in one line that names what broke, the last good checkpoint and what the run's settings make
    the likely fix (config_checks.non_finite_remedy)."""
    last = list_checkpoints(Path(out_dir) / "checkpoints")
    where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
    raise UserError(f"{what} became non-finite at step {step}; stopped, {where}; "
                    f"{remedy or 'lower the learning rate or enable gradient clipping'}")
