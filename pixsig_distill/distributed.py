"""Training on several processes (DDP, FSDP, DeepSpeed): what changes, in one place.

The loop and the methods are written as if for one process; accelerate makes them data-parallel.
What differs once there are several processes, and more once a strategy shards the networks:

* the Accelerator must exist before any model is built, so that the teacher lands on this
  process's device (`make_accelerator`);
* full weights for a checkpoint are gathered from every process (`model_state_dicts`: a
  collective under FSDP and ZeRO-3, so every process calls it and the main one writes);
* a sharded optimizer holds only this process's part of its state, which our one-file-per-network
  checkpoints cannot hold (`optimizer_sharded`: such checkpoints keep weights and EMA, and AdamW's
  moments restart on resume);
* outside forward/backward a parameter may be a shard (FSDP) or an empty placeholder (ZeRO-3): the
  EMA update reads them inside `full_parameters`.

Only the DDP path is exercised by the tests (two CPU processes over gloo, tests/test_multiprocess.py);
FSDP and DeepSpeed need GPUs and are untested here (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .errors import UserError

log = logging.getLogger(__name__)

DIGEST_ENV = "PIXSIG_RANK_DIGESTS"  # test hook, see write_rank_digest


def make_accelerator(device: str = "auto", mixed_precision: str = "no", grad_accum: int = 1,
                     batch_size: int = 1) -> Accelerator:
    """This process's Accelerator; create it before building any model, then put models on its device.

    `device=cpu` (or `auto` on a machine without CUDA) makes CPU processes, joined over gloo under a
    multi-process launch. `device=cuda:N` picks a GPU for a single-process run; under a launch
    accelerate gives each process its own GPU (`device=auto`)."""
    from .teacher import resolve_device

    wanted = resolve_device(device)
    if wanted.type == "cuda" and wanted.index is not None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(f"device={device} under a multi-process launch; use device=auto, accelerate gives "
                            f"every process its own GPU")
        torch.cuda.set_device(wanted)
    # Gradient accumulation is the methods' own (methods/common.py: accumulated_step), not accelerate's.
    accelerator = Accelerator(cpu=wanted.type == "cpu", mixed_precision=mixed_precision)
    if getattr(accelerator, "is_fsdp2", False):
        raise UserError("fsdp_version: 2 is not supported (DMD prepares two networks in one call, which "
                        "accelerate's FSDP2 refuses); use pixsig_distill/conf/accelerate/fsdp_*.yaml (fsdp_version: 1)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and grad_accum > 1:
        raise UserError(f"train.grad_accum={grad_accum} under DeepSpeed: DeepSpeed steps its optimizer inside every "
                        f"backward unless it runs its own accumulation, which this toolkit does not drive; use "
                        f"train.grad_accum=1 with a larger train.batch_size, or DDP/FSDP (docs/scaling.md)")
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        # accelerate reads the micro-batch from a prepared DataLoader; the loop batches by itself.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size * grad_accum
    return accelerator


def optimizer_sharded(accelerator) -> bool:
    """Does each process hold only a shard of the optimizer state (FSDP, DeepSpeed ZeRO)?"""
    return accelerator is not None and accelerator.distributed_type in (DistributedType.FSDP,
                                                                        DistributedType.DEEPSPEED)


def parameters_sharded(accelerator) -> bool:
    """Are the weights themselves sharded between steps (FSDP, DeepSpeed ZeRO-3)?"""
    if accelerator is None:
        return False
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3
    return False


def model_state_dicts(method, accelerator) -> dict[str, dict]:
    """name → full state dict of every module the method checkpoints. Call it on every process:
    gathering sharded weights is collective (under FSDP only the main process receives them)."""
    if accelerator is None:
        return {name: module.state_dict() for name, module in method.checkpoint_modules().items()}
    prepared = {id(accelerator.unwrap_model(model)): model for model in method.models.values()}
    out = {}
    for name, module in method.checkpoint_modules().items():
        model = prepared.get(id(module))  # a trained network: accelerate knows how to gather it
        out[name] = accelerator.get_state_dict(model) if model is not None else module.state_dict()
    return out


@contextlib.contextmanager
def full_parameters(accelerator, model):
    """The unwrapped `model` with its full parameters readable (the EMA update reads them).

    Collective under FSDP and ZeRO-3: every process must enter it. Elsewhere it only unwraps."""
    if accelerator is None:
        yield model
        return
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            yield unwrapped
    elif parameters_sharded(accelerator):  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None):
            yield unwrapped
    else:
        yield unwrapped


def optimizers_to_resume(checkpoint: Path, optimizers: dict, accelerator) -> dict:
    """The optimizers whose state a resume restores: none when this run shards them, none when the
    checkpoint was written without them (by a sharded run); AdamW's moments then restart."""
    try:
        saved = json.loads((Path(checkpoint) / "state.json").read_text()).get("optimizer_states", True)
    except (OSError, ValueError, AttributeError):
        return optimizers  # load_checkpoint reports the broken checkpoint
    if optimizer_sharded(accelerator) or not saved:
        log.warning("resuming from %s without optimizer states (%s): the optimizers start afresh", checkpoint,
                    "this run shards them" if saved else "the checkpoint has none")
        return {}
    return optimizers


def check_same_step(accelerator, step: int, out_dir: Path) -> None:
    """Every process must resume from the same checkpoint; they differ when out_dir is not shared."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    if len(set(steps)) > 1:
        raise UserError(f"the processes found different checkpoints to resume from (steps {steps}); "
                        f"out_dir='{out_dir}' must be one folder that every machine sees (a shared filesystem)")


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_rank_digest(out_dir: Path, step: int, accelerator, state_dicts: dict[str, dict]) -> None:
    """Test hook: with PIXSIG_RANK_DIGESTS=1, every process writes the digests of the weights it holds at
    each checkpoint to out_dir/rank_digests/ (tests/test_multiprocess.py compares the processes). Off
    otherwise; meaningful for replicated weights (DDP), not for FSDP where only the main process has them."""
    if not os.environ.get(DIGEST_ENV):
        return
    folder = Path(out_dir) / "rank_digests"
    folder.mkdir(parents=True, exist_ok=True)
    rank = accelerator.process_index if accelerator is not None else 0
    digests = {name: state_digest(sd) for name, sd in state_dicts.items()}
    (folder / f"step-{step:07d}-rank-{rank}.json").write_text(json.dumps(digests, indent=1))
