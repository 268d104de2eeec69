"""Training on several processes (DDP, FSDP2, DeepSpeed): what changes, in one place.

The loop and the methods are written as if for one process; accelerate makes them data-parallel.
What differs once there are several processes, and more once a strategy shards the networks:

* the Accelerator must exist before any model is built, so that the teacher lands on this
  process's device (`make_accelerator`);
* every trained network is prepared with its own optimizer, one `accelerator.prepare` call each
  (FSDP2 takes one model per call; DMD trains two);
* under FSDP2 a parameter is a DTensor shard between steps: full weights for a checkpoint or the EMA
  are gathered with `full_tensor` (a collective: every process calls it), and the optimizer state is
  gathered to the main process in torch's FQN-keyed form (`optimizer_state_dicts`) and scattered back
  on resume (`load_optimizer_states`), so a sharded run resumes with its AdamW moments;
* under DeepSpeed every trained network is its own engine, stepped by the method (deepspeed_engines.py); its
  optimizer state is gathered from the ZeRO partitions into the same parameter-name keyed form.

tests/test_multiprocess.py (DDP), tests/test_fsdp.py (FSDP2) and tests/test_deepspeed.py (ZeRO-2/3) run all of
this with two CPU processes over gloo.
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

from . import deepspeed_engines
from .deepspeed_engines import is_deepspeed
from .errors import UserError

log = logging.getLogger(__name__)

DIGEST_ENV = "PIXSIG_RANK_DIGESTS"  # test hook, see write_rank_digest


def make_accelerator(device: str = "auto", mixed_precision: str = "no", grad_accum: int = 1,
                     batch_size: int = 1, log_with=None, out_dir=None) -> Accelerator:
    """This process's Accelerator; create it before building any model, then put models on its device.

    `log_with`: accelerate's experiment trackers (tensorboard, wandb, mlflow, ...), their files under
    `out_dir`/tensorboard (TensorBoard's) or where the tracker puts them (wandb: WANDB_DIR, default out_dir).
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
    project = None
    if out_dir is not None:
        from accelerate.utils import ProjectConfiguration

        project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(Path(out_dir) / "tensorboard"))
    _shipped_deepspeed_config()
    accelerator = Accelerator(cpu=wanted.type == "cpu", mixed_precision=mixed_precision,
                              log_with=list(log_with) if log_with else None, project_config=project)
    if wanted.type == "cpu" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu(accelerator)
    if wanted.type == "cpu" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _deepspeed_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise UserError("fsdp_version: 1 is retired in this toolkit; launch with "
                        "pixsig_distill/conf/accelerate/fsdp2_full_shard.yaml or fsdp2_shard_grad_op.yaml "
                        "(fsdp_version: 2, docs/scaling.md)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        deepspeed_engines.check_grad_accum(grad_accum)
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        # accelerate reads the micro-batch from a prepared DataLoader; the loop batches by itself.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size * grad_accum
    return accelerator


def _shipped_deepspeed_config() -> None:
    """The shipped launch configs name their DeepSpeed JSON by its path in the repository
    (`pixsig_distill/conf/accelerate/deepspeed_zero3.json`): launched from elsewhere, it is the installed package's."""
    name = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if name != "none" and not Path(name).is_file() and name.startswith("pixsig_distill/"):
        installed = Path(__file__).resolve().parent.parent / name
        if installed.is_file():
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(installed)


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """accelerate turns an FSDP launch into FSDP for GPU processes only (CPU processes become plain MULTI_CPU).
    torch's FSDP2 runs on CPU over gloo, so for CPU processes (tests, debugging) we switch the shared state to the
    launch's FSDP plugin ourselves: from here on the run goes through accelerate's own FSDP2 code, as on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.num_processes < 2:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` set
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does for GPU processes


def _deepspeed_on_cpu(accelerator: Accelerator) -> None:
    """The same switch for a DeepSpeed launch: DeepSpeed's CPU accelerator trains over the gloo group accelerate
    made (tests/test_deepspeed.py), through accelerate's own DeepSpeed code from here on."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin

    state = accelerator.state
    if state.num_processes < 2:
        return
    plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables `accelerate launch` set
    plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    state.deepspeed_plugins = {"default": plugin}
    plugin.select(_from_accelerator_state=True)
    state._mixed_precision = "no"  # DeepSpeed casts by its own config, as accelerate arranges on GPUs
    _without_shared_memory_all_reduce()


def _without_shared_memory_all_reduce() -> None:
    """DeepSpeed's CPU backend compiles a C++ shared-memory all-reduce kernel when its process group starts (about
    a minute on 2 cores, and a compiler on the machine). Only its inference all-reduce uses that kernel, never
    ZeRO training, which reduces through torch.distributed: mark it unusable, as DeepSpeed does where the kernel
    cannot build, and it is never compiled."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def parameters_sharded(accelerator) -> bool:
    """Are the weights themselves sharded between steps (FSDP2, DeepSpeed ZeRO-3)?"""
    if accelerator is None:
        return False
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3
    return False


def engine_name(accelerator) -> str:
    """ddp | fsdp2 | zero2 | zero3: how this run splits its networks, in the planner's words (plan.engine); ddp for
    one process. A method's `check_engine` refuses what it cannot run under it, for training and for a plan."""
    if accelerator is not None and accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp2"
    if is_deepspeed(accelerator):
        return "zero3" if parameters_sharded(accelerator) else "zero2"
    return "ddp"


def zero3(accelerator) -> bool:
    """DeepSpeed ZeRO-3: parameters are empty placeholders outside forward/backward."""
    return (accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED
            and parameters_sharded(accelerator))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard (DTensor) is gathered, a collective every process must join."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """param ← full; a sharded param keeps only its own shard of `full` (the same on every process)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements)
    param.copy_(full)


def clip_grad_norm(accelerator, model, max_norm: float) -> torch.Tensor | None:
    """Clip `model`'s gradients to a total norm of `max_norm`; returns the norm before clipping.

    Under FSDP2 accelerate finds the model by comparing parameter lists with `==`, which fails once a second
    model is prepared (DMD): there torch's clip runs directly; it reduces the sharded (DTensor) gradients itself."""
    if accelerator.is_fsdp2:
        accelerator.unscale_gradients()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
        return full_tensor(norm)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


def model_state_dicts(method, accelerator) -> dict[str, dict]:
    """name → full state dict (on the CPU) of every module the method checkpoints. Call it on every process:
    gathering sharded weights is collective (every process then holds them)."""
    for model in method.models.values():
        resharded(model)  # first: checkpoint_modules() may hold the parameters registered now (LoRA adapters)
    modules = method.checkpoint_modules()
    masters = deepspeed_engines.master_weights(method.models.values()) if is_deepspeed(accelerator) else {}
    with contextlib.ExitStack() as gathered:
        for model in method.models.values():  # ZeRO-3: every network's full (frozen) weights, for a moment
            gathered.enter_context(full_parameters(accelerator, model))
        keep = (lambda t: t.clone()) if zero3(accelerator) else (lambda t: t)  # ZeRO-3 frees them on leaving
        return {name: _state_dict(module, masters, keep) for name, module in modules.items()}


def _state_dict(module: torch.nn.Module, masters: dict[int, torch.Tensor], keep) -> dict[str, torch.Tensor]:
    """`module`'s full state dict on the CPU, its trained parameters replaced by their masters (DeepSpeed)."""
    by_name = {name: masters[id(p)] for name, p in module.named_parameters() if id(p) in masters}
    return {key: by_name[key] if key in by_name else keep(full_tensor(value).detach().cpu())
            for key, value in module.state_dict().items()}


@contextlib.contextmanager
def full_parameters(accelerator, model):
    """The unwrapped `model` with its full parameters readable (the EMA update reads them).

    Collective under ZeRO-3: every process must enter it. FSDP2 parameters are DTensors, which the EMA gathers
    one by one (`full_tensor`); elsewhere this only unwraps."""
    if accelerator is None:
        yield model
        return
    unwrapped = accelerator.unwrap_model(model)
    if zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None):
            yield unwrapped
    else:
        yield unwrapped


def resharded(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every FSDP2 unit holding its sharded parameters again. A forward outside backward (no_grad:
    LCM-LoRA's target, previews) leaves the root unit's parameters gathered and registered in place of the
    DTensors the optimizer holds; the state-dict functions map parameters by name and need the DTensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def optimizer_state_dicts(method, accelerator) -> dict[str, dict]:
    """name → the optimizer's full state keyed by parameter names (torch.distributed.checkpoint.state_dict), on the
    main process; gathered from the shards under FSDP2 (collective: call it on every process). {} under DeepSpeed,
    whose optimizer is its own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if is_deepspeed(accelerator):
        return {name: deepspeed_engines.optimizer_state_dict(_model_of(method, name)) for name in method.optimizers}
    sharded = parameters_sharded(accelerator)
    options = StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
    return {name: get_optimizer_state_dict(resharded(_model_of(method, name)), _torch_optimizer(optimizer),
                                           options=options)
            for name, optimizer in method.optimizers.items()}


def restore_master_weights(checkpoint: Path, method, accelerator) -> None:
    """After `prepare`, under DeepSpeed: the checkpoint's fp32 weights into the engines' masters (a bf16 engine
    made its masters from bf16-rounded weights). Elsewhere the weights loaded before `prepare` are the masters."""
    if not is_deepspeed(accelerator):
        return
    from safetensors.torch import load_file

    modules = method.checkpoint_modules()
    saved = {name: load_file(str(Path(checkpoint) / f"{name}.safetensors")) for name in modules}
    deepspeed_engines.restore_master_weights(method.models.values(), modules, saved)


def load_optimizer_states(states: dict[str, dict], method, accelerator) -> None:
    """Restore the optimizers after `prepare` (FSDP2 replaces the parameters an optimizer holds): each process
    reads the full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if is_deepspeed(accelerator):
        for name, state in states.items():
            deepspeed_engines.load_optimizer_state_dict(_model_of(method, name), state)
        return
    options = StateDictOptions(full_state_dict=parameters_sharded(accelerator))
    for name, state in states.items():
        optimizer = _torch_optimizer(method.optimizers[name])
        if state.get("legacy_ids"):  # written before checkpoints keyed the state by parameter name
            optimizer.load_state_dict({k: v for k, v in state.items() if k != "legacy_ids"})
        else:
            set_optimizer_state_dict(resharded(_model_of(method, name)), optimizer, state, options=options)


def _model_of(method, name: str) -> torch.nn.Module:
    """The trained network an optimizer belongs to: methods name both alike (generator, fake_score, student)."""
    if name not in method.models:
        raise KeyError(f"optimizer '{name}' has no network of the same name in method.models")
    return method.models[name]


def resumable_optimizers(checkpoint: Path, method, accelerator) -> list[str]:
    """The optimizers whose state a resume restores: all, unless this run keeps its own (DeepSpeed) or the
    checkpoint was written without them; AdamW's moments then restart (logged)."""
    try:
        saved = json.loads((Path(checkpoint) / "state.json").read_text()).get("optimizer_states", True)
    except (OSError, ValueError, AttributeError):
        saved = True  # load_checkpoint reports the broken checkpoint
    if not saved:
        log.warning("resuming from %s without optimizer states (the checkpoint has none): the optimizers start "
                    "afresh", checkpoint)
        return []
    return list(method.optimizers)


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
    otherwise. Every process holds the full weights here (gathered under FSDP2), so their digests must agree."""
    if not os.environ.get(DIGEST_ENV):
        return
    folder = Path(out_dir) / "rank_digests"
    folder.mkdir(parents=True, exist_ok=True)
    rank = accelerator.process_index if accelerator is not None else 0
    digests = {name: state_digest(sd) for name, sd in state_dicts.items()}
    (folder / f"step-{step:07d}-rank-{rank}.json").write_text(json.dumps(digests, indent=1))


def device_name(device) -> str:
    """What a figure was measured on: the GPU's name, or the CPU's with the thread count."""
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{device.type} ({cpu}, {torch.get_num_threads()} threads)"
