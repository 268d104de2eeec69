"""Crash-safe checkpoints in safetensors only (no pickles): weights, optimizer states, step.

A checkpoint is a folder `checkpoints/step-XXXXXXX/` written under a temporary name and renamed
when complete, so a run killed mid-write leaves only a `.tmp-*` folder that resume ignores (and the
next save deletes). Nothing here unpickles: a folder with pickle files is refused, not loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError, first_line
from .faults import fault_point

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")  # torch.save / pickle formats


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state keyed by parameter name ({name: {exp_avg: ...}}) → safetensors tensors + JSON rest."""
    tensors, scalars = {}, {}
    for param, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{key}"] = value.detach().to("cpu", copy=True).contiguous()  # own storage
            else:
                scalars[f"{param}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars, "keys": "names"}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    for group in meta["param_groups"]:  # under a schedule, lr is the step's and initial_lr the base (lr_schedule.py)
        if "initial_lr" in group:
            group["lr"] = group.pop("initial_lr")
    state: dict = {}
    legacy = meta.get("keys") != "names"  # older checkpoints keyed the state by parameter index
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        param, key = name.rsplit(".", 1)  # optimizer state keys (exp_avg, step, ...) hold no dot
        state.setdefault(int(param) if legacy else param, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"], **({"legacy_ids": True} if legacy else {})}


def save_checkpoint(ckpt_root: Path, step: int, models: dict[str, dict], optimizers: dict[str, dict], extra: dict,
                    keep: int = 2) -> Path:
    """Write models and optimizers (name → state dict) atomically; keep the `keep` newest checkpoints."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    for stale in ckpt_root.glob(".tmp-*"):  # left by a run that was killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, state_dict in models.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / f"{name}.safetensors"))
    for name, state_dict in optimizers.items():
        tensors, meta = _flatten_optimizer(state_dict)
        save_file(tensors, str(tmp / f"optimizer-{name}.safetensors"), metadata={"meta": json.dumps(meta)})
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **extra}, indent=1))
    for f in tmp.iterdir():  # make the data durable before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fault_point("checkpoint")  # tests/test_faults.py: a crash here must leave no trusted checkpoint
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)  # and the rename itself
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial `.tmp-*` folders are never listed)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if (p / STATE_FILE).is_file())


def resolve_resume(resume: str | None, ckpt_root: Path) -> Path | None:
    """`auto` → newest complete checkpoint in the run (or None); `never`/None → None; else a path."""
    if resume in (None, "never", "none", False):
        return None
    if resume == "auto":
        return _newest_intact(list_checkpoints(ckpt_root))
    path = Path(str(resume)).expanduser()
    pickles = sorted(f.name for f in path.glob("*") if f.suffix.lower() in PICKLE_SUFFIXES) if path.is_dir() else []
    if path.is_file() or pickles:
        what = f"holds pickle files ({', '.join(pickles[:3])})" if pickles else "is a file"
        raise UserError(f"resume='{resume}' {what}; checkpoints are safetensors folders and pickles are never "
                        f"loaded (unpickling can run code); use resume=auto, resume=never or a checkpoints/step-N "
                        f"folder written by this toolkit")
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume='{resume}' is not a complete checkpoint folder (no {STATE_FILE}); "
                        f"use resume=auto, resume=never or a checkpoints/step-N folder")
    return path


def _newest_intact(found: list[Path]) -> Path | None:
    """The newest checkpoint whose files read back; a damaged newer one is skipped, and the log says so."""
    problems = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log.warning("resuming from the intact earlier checkpoint %s: %s", path.name, "; ".join(problems))
            return path
        problems.append(f"{path.name} is damaged ({problem})")
    if problems:
        raise UserError(f"every checkpoint in '{found[-1].parent}' is damaged ({'; '.join(problems)}); "
                        f"use resume=never to start over")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be read (None if its state and every tensor file's header and
    length check out). Reads headers only: a multi-GiB checkpoint is checked in milliseconds."""
    from safetensors import safe_open

    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{STATE_FILE} has no step"
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                f.keys()
    except Exception as err:  # noqa: BLE001  (any failure to read is damage)
        return first_line(err)
    return None


def keep_configured_hyperparameters(name: str, optimizer, configured: list[dict]) -> None:
    """A resumed optimizer keeps its moments but takes the learning rate (and the other settings) of the command
    that resumed it: a user who resumes with a new lr gets it, and the log says so."""
    for group, wanted in zip(optimizer.param_groups, configured):
        for key, value in wanted.items():
            saved = group.get(key)
            if (list(saved) if isinstance(saved, (list, tuple)) else saved) != (
                    list(value) if isinstance(value, (list, tuple)) else value):  # JSON turned tuples into lists
                log.warning("optimizer %s: %s was %s in the checkpoint; using %s from the config", name, key,
                            saved, value)
            group[key] = value


def load_checkpoint(path: Path, models: dict[str, torch.nn.Module]) -> dict:
    """Load the weights in place; returns the saved state (step, ...). Optimizer states: `read_optimizer_states`."""
    return _readable(path, lambda: _load_models(path, models))


def _load_models(path: Path, models: dict[str, torch.nn.Module]) -> dict:
    for name, module in models.items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    return json.loads((path / STATE_FILE).read_text())


def read_optimizer_states(path: Path, names) -> dict[str, dict]:
    """name → the optimizer state saved in the checkpoint (keyed by parameter name)."""
    from safetensors import safe_open

    def read():
        out = {}
        for name in names:
            file = path / f"optimizer-{name}.safetensors"
            with safe_open(str(file), "pt") as f:
                meta = json.loads(f.metadata()["meta"])
            out[name] = _unflatten_optimizer(load_file(str(file)), meta)
        return out

    return _readable(path, read)


def _readable(path: Path, read):
    try:
        return read()
    except UserError:
        raise
    except Exception as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"checkpoint '{path}' is corrupt or from another configuration ({first}); "
                        f"delete it or use resume=never") from None
