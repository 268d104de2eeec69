"""The one training loop every distillation method runs on.

A method supplies its networks and a `train_step`; this loop supplies the rest: accelerate
(devices, processes, mixed precision, gradient accumulation), deterministic per-step noise,
logging (a line per interval, TensorBoard, a progress bar), preview grids, atomic safetensors
checkpoints, resume, a time budget, the non-finite-loss guard and the final export.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import STATE_FILE, list_checkpoints, load_checkpoint, resolve_resume
from .distributed import parameters_sharded
from .draws import StepDraws
from .config import fingerprint_changes, flat_settings
from .config_checks import non_finite_remedy
from .errors import UserError
from .faults import fault_point
from .images import save_grid, to_uint8
from .lr_schedule import LRSchedules
from .methods.base import Method  # what a method gives the loop: the contract, in one place
from .run_state import restore_state, save_state, stop_non_finite

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """The `train:` settings; conf/train.yaml is the one home of their defaults and of what each means."""

    max_steps: int
    time_budget_min: float | None
    batch_size: int
    grad_accum: int
    mixed_precision: str
    gradient_checkpointing: bool
    deterministic: bool
    num_workers: int
    log_every: int
    sample_every: int
    ckpt_every: int
    keep_checkpoints: int
    preview_prompts: list[str]
    log_with: list[str]  # accelerate's trackers
    lr_schedule: dict  # {name, warmup_steps}: lr_schedule.py


class RunLock:
    """One run per output folder: a second run on the same folder stops instead of corrupting it.

    An advisory `flock` on `out_dir/.lock`: the kernel drops it when the holder dies (even by SIGKILL),
    so a crashed run never blocks the next one. Re-entrant within a process (train.run takes it before
    writing anything, the loop takes it again)."""

    _held: dict[str, int] = {}  # lock path → nesting depth, in this process

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.key = str(self.path.absolute())
        self.file = None

    def __enter__(self):
        if self.key in RunLock._held:
            RunLock._held[self.key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")  # never truncate: the lock file may be another run's
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise UserError(f"another run is using '{self.path.parent}'; wait for it to finish or pick another "
                            f"out_dir=") from None
        RunLock._held[self.key] = 1
        return self

    def __exit__(self, *exc):
        RunLock._held[self.key] -= 1
        if RunLock._held[self.key] == 0:
            del RunLock._held[self.key]
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random numbers of step `step` depend only on it: resume replays them exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009)


def step_draws(seed: int, step: int, process: int, num_processes: int) -> StepDraws:
    """This process's rows of the step's draws, made for the global batch (draws.py): the split into processes
    does not change the numbers. They carry the step's number, for a method's own schedules."""
    return StepDraws(step_generator(seed, step), process, num_processes, step)


def batch_indices(n_items: int, batch_size: int, step: int, process: int, num_processes: int, seed: int):
    """Indices of one process's batch at `step`: a fresh seeded permutation every epoch."""
    global_batch = batch_size * num_processes
    start = step * global_batch + process * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        out.append(int(perm[offset]))
    return out


def collate(items: list[dict]) -> dict:
    batch = {"prompt": [it["prompt"] for it in items]}
    for key in items[0]:
        if key != "prompt":
            batch[key] = torch.stack([it[key] for it in items])
    return batch


def train(method: Method, dataset, teacher, cfg: LoopConfig, out_dir: Path, seed: int = 0,
          resume: str | None = "auto", accelerator: Accelerator | None = None, fresh_method=None,
          tracker_config: dict | None = None, fingerprint: dict | None = None) -> dict:
    """Train `method` until `cfg.max_steps` (or the time budget); returns a summary dict.

    `fresh_method()` builds an unprepared copy of the method: with sharded weights (FSDP2) the export is
    written from it, loaded with the final checkpoint's gathered weights. `tracker_config`: the run's settings,
    recorded by the experiment trackers. `fingerprint`: the settings that make the run what it is
    (config.run_fingerprint), recorded in every checkpoint; `resume=auto` refuses a checkpoint recorded with others."""
    out_dir = Path(out_dir)
    accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    ckpt_root = out_dir / "checkpoints"
    with RunLock(out_dir) if accelerator.is_main_process else _nullcontext():
        path = resolve_resume(resume, ckpt_root)
        if path is not None and resume == "auto":
            _refuse_other_settings(path, fingerprint, out_dir)
        state = restore_state(path, method, accelerator, out_dir)  # run_state.py: prepares the method too
        schedules = LRSchedules(method.optimizers, **cfg.lr_schedule, total_steps=cfg.max_steps)
        if path is not None:
            schedules.load_state_dict(state.get("lr_schedules"), state["step"])
        summary = _run(method, dataset, teacher, cfg, out_dir, seed, state["step"], accelerator, schedules,
                       fresh_method, tracker_config, fingerprint)
    return summary


def _refuse_other_settings(path: Path, fingerprint: dict | None, out_dir: Path) -> None:
    """The run in `out_dir` was trained with other settings than this command's (say `t_bar=200` on the folder of
    a T̄ = 400 run): one line naming them, instead of resuming those weights under the new settings' card."""
    recorded = json.loads((path / STATE_FILE).read_text()).get("fingerprint")
    changed = fingerprint_changes(recorded, fingerprint) if recorded and fingerprint else []
    if changed:
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(f"out_dir='{out_dir}' holds a run with other settings ({'; '.join(changed[:4])}{more}); give "
                        f"this run its own out_dir, re-run with the recorded settings to resume, or pass resume=never "
                        f"to start over in that folder")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run(method, dataset, teacher, cfg: LoopConfig, out_dir: Path, seed: int, step: int, accelerator,
         schedules: LRSchedules, fresh_method=None, tracker_config: dict | None = None,
         fingerprint: dict | None = None) -> dict:
    main = accelerator.is_main_process
    # A sharded network's forward is a collective: every process takes part in the previews then.
    preview_here = main or parameters_sharded(accelerator)
    if cfg.log_with:  # accelerate's trackers (TensorBoard by default; wandb, mlflow, ...): scalars and previews
        wandb = {"name": out_dir.name, "dir": os.environ.get("WANDB_DIR") or str(out_dir)}  # files beside the run's
        accelerator.init_trackers("pixsig-distill", config=_tracker_settings(tracker_config or {}), init_kwargs={"wandb": wandb})
    previews = _preview_inputs(teacher, cfg.preview_prompts, seed)
    started, last_log, samples_since = time.time(), time.time(), 0
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else math.inf
    stopped_by_budget = False
    logs: dict[str, float] = {}
    # A step is one update of every trained network from batch_size × grad_accum samples per process; the method
    # splits them into grad_accum micro-batches of batch_size (methods/common.py: accumulated_step).
    samples_per_step = cfg.batch_size * cfg.grad_accum
    remedy = non_finite_remedy(fingerprint or {}, cfg.mixed_precision)  # what this run's settings make likely
    watch = StallWatch(method, remedy)
    # closed however the loop ends (a one-line error mid-run would otherwise leave the bar on the console)
    with tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not main, dynamic_ncols=True) as bar:
        while step < cfg.max_steps:
            indices = batch_indices(len(dataset), samples_per_step, step, accelerator.process_index,
                                    accelerator.num_processes, seed)
            batch = _to_device(_encode(collate([dataset[i] for i in indices]), teacher), accelerator.device)
            draws = step_draws(seed, step, accelerator.process_index, accelerator.num_processes)
            resting = {name for name, factor in schedules.factors().items() if factor == 0}  # a warm-up's step 0
            logs = method.train_step(batch, draws, cfg.grad_accum)
            logs = {**{k: float(v) for k, v in logs.items()}, **schedules.lrs()}
            fault_point("step")  # tests/test_faults.py: a crash here loses only the steps since the last checkpoint
            bad = [k for k, v in logs.items() if k.startswith("loss") and not math.isfinite(v)]
            if bad:
                stop_non_finite(", ".join(bad), step + 1, out_dir, remedy)
            watch.after_step(logs, resting)
            schedules.step()
            step += 1
            samples_since += samples_per_step * accelerator.num_processes
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                watch.check(step, out_dir)
                rate = samples_since / max(1e-9, time.time() - last_log)
                last_log, samples_since = time.time(), 0
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")})
                if main:
                    log.info("step %d/%d  %s  %.1f samples/s", step, cfg.max_steps,
                             "  ".join(f"{k} {v:.4g}" for k, v in logs.items()), rate)
                accelerator.log({**logs, "samples_per_s": rate}, step=step)
            if previews and preview_here and (step % cfg.sample_every == 0 or step == cfg.max_steps):
                grid = _save_preview(method, teacher, previews, out_dir / "samples" / f"step-{step:07d}.png", main)
                if grid is not None:
                    log_image(accelerator, "samples", grid, step)
            over_budget = time.time() - started > budget_s
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or over_budget:
                save_state(method, accelerator, out_dir, step, cfg.keep_checkpoints,
                           {"fingerprint": fingerprint, "lr_schedules": schedules.state_dict()})
            if over_budget and step < cfg.max_steps:
                stopped_by_budget = True
                accelerator.print(f"time budget of {cfg.time_budget_min} min reached at step {step}; "
                                  f"re-run the same command to continue")
                break
    summary = {"step": step, "finished": step >= cfg.max_steps, "minutes": (time.time() - started) / 60,
               "last_logs": logs}
    if step >= cfg.max_steps and main and not stopped_by_budget:
        summary["export"] = str(_exportable(method, accelerator, fresh_method, out_dir).export(out_dir / "export"))
    for tracker in accelerator.trackers:  # not end_training(): that also tears down the process group the caller still uses
        tracker.finish()
    if main:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    return summary


def _exportable(method, accelerator, fresh_method, out_dir: Path):
    """The method itself, or with sharded weights (FSDP2: DTensor shards, which neither deepcopy nor
    save_pretrained take) a fresh unprepared copy holding the final checkpoint's gathered weights."""
    if not parameters_sharded(accelerator):
        return method
    if fresh_method is None:
        raise UserError("this run shards its weights and the loop was given no fresh_method to export from")
    fresh = fresh_method()
    load_checkpoint(list_checkpoints(out_dir / "checkpoints")[-1], fresh.checkpoint_modules())
    return fresh


class StallWatch:
    """Stops a run whose trained networks do not train: a network whose weights did not change over a logging
    interval, or whose gradient norm was non-finite at every step of it, would otherwise let a run "succeed" and
    export the teacher unchanged."""

    def __init__(self, method, remedy: str = "lower the learning rate"):
        self.method, self.remedy = method, remedy
        self.fingerprints = self._fingerprints()
        self.bad_norms: dict[str, int] = {}
        self.rested: dict[str, int] = {}  # steps a network's scheduled lr was 0 (a warm-up's first step)
        self.steps = 0

    def _fingerprints(self) -> dict[str, float]:
        # A cheap weighted sum of this process's (possibly sharded) trainable weights; any update changes it.
        out = {}
        for name, model in self.method.models.items():
            params = [getattr(p, "_local_tensor", p).detach() for p in model.parameters() if p.requires_grad]
            params = [p for p in params if p.numel()]  # an FSDP2 shard can be empty
            if params:
                out[name] = sum(float(p.double().sum() + (p.double() ** 2).sum()) for p in params)
        return out

    def after_step(self, logs: dict[str, float], resting: set[str] = frozenset()) -> None:
        self.steps += 1
        for key, value in logs.items():
            if key.startswith("grad_norm") and not math.isfinite(value):
                self.bad_norms[key] = self.bad_norms.get(key, 0) + 1
        for name in resting:
            self.rested[name] = self.rested.get(name, 0) + 1

    def check(self, step: int, out_dir: Path) -> None:
        always_bad = [k for k, n in self.bad_norms.items() if n == self.steps]
        now = self._fingerprints()
        frozen = [name for name, value in now.items()
                  if self.fingerprints.get(name) == value and self.rested.get(name, 0) < self.steps]
        self.fingerprints, self.bad_norms, self.rested, self.steps = now, {}, {}, 0
        if always_bad:
            raise UserError(f"{', '.join(always_bad)} was non-finite at every step up to step {step}: the network "
                            f"gets no usable gradient; stopped ({self.remedy})")
        if frozen:
            raise UserError(f"the weights of {', '.join(frozen)} did not change in the logging interval that ended at "
                            f"step {step}: the network is not training; stopped (check the learning rate and "
                            f"train.grad_accum, and see {out_dir / 'train.log'})")


def _encode(batch: dict, teacher) -> dict:
    """Use cached T5 embeddings when the data has them, else run the teacher's text encoder."""
    if "embeds" not in batch:
        batch["embeds"], batch["mask"] = teacher.encode_prompts(batch["prompt"])
    return batch


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _preview_inputs(teacher, prompts: list[str], seed: int):
    if not prompts or not teacher.can_encode(list(prompts)):  # no T5: cached prompts only (train.py)
        return None
    embeds, mask = teacher.encode_prompts(list(prompts))
    noise = torch.randn(teacher.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(seed))
    return embeds, mask, noise.to(teacher.device, teacher.dtype)


@torch.no_grad()
def _save_preview(method, teacher, previews, path: Path, write: bool = True) -> np.ndarray | None:
    embeds, mask, noise = previews
    latents = method.sample(embeds, mask, noise)
    if not write:
        return
    images = to_uint8(method.decode(latents))  # the teacher's VAE, or the decoder a method trains
    save_grid(images, path, columns=len(noise), scale=max(1, 128 // images.shape[1]))  # small images only
    return np.concatenate(list(images), axis=1)  # one row, (H, W·n, 3) uint8: what the trackers show


def log_image(accelerator, name: str, image: np.ndarray, step: int) -> None:
    """An (H, W, 3) uint8 image to every tracker, each in its own format."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, image, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [image]}, step=step)


def _tracker_settings(config: dict) -> dict:
    """Nested hyperparameters as flat scalar keys (what TensorBoard's hparams and the trackers' config take)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flat_settings(config).items()}
