"""DeepSpeed ZeRO under accelerate: one engine per trained network, stepped by the methods themselves.

accelerate's DeepSpeed integration drives one engine through `accelerator.backward` (it steps the engine it
prepared first). DMD trains two networks, the generator and the fake score, so each trained network here is its
own engine (`prepare`) and a method's update calls that engine's backward and step (`step`), as DeepSpeed's own
training loops do. DeepSpeed clips by its config: the method's `grad_clip` is written there before the engine is
built.

Checkpoints stay safetensors: the optimizer state is gathered from the ZeRO partitions per parameter
(`safe_get_full_optimizer_state`, a collective) into the same parameter-name keyed form the DDP and FSDP2 runs
save, and scattered back on resume, so a ZeRO run resumes with its AdamW moments (the files do not depend on the
process count: a 2-process run resumes on 1, tests/test_deepspeed.py). The moments are AdamW's (`exp_avg`,
`exp_avg_sq`): an optimizer with other state keys (bitsandbytes' 8-bit AdamW) is not supported under DeepSpeed.
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType

from .errors import UserError

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def is_deepspeed(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED


def prepare(accelerator, model: torch.nn.Module, optimizer, grad_clip: float | None):
    """`accelerator.prepare(model, optimizer)`; under DeepSpeed an engine of its own for this network."""
    if not is_deepspeed(accelerator):
        return accelerator.prepare(model, optimizer)
    check_optimizer(type(optimizer))
    accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = float(grad_clip or 0.0)
    engine, optimizer = accelerator.prepare(model, optimizer)
    accelerator.deepspeed_engine_wrapped = None  # every engine is stepped by `step`, not accelerator.backward
    return engine, optimizer


def check_optimizer(kind) -> None:
    """The optimizers a DeepSpeed run takes (training's `prepare` and a plan with plan.engine=zero2|zero3)."""
    if not (isinstance(kind, type) and issubclass(kind, (torch.optim.Adam, torch.optim.AdamW))):
        raise UserError(f"{getattr(kind, '__name__', kind)} under DeepSpeed: checkpoints gather AdamW's moments from "
                        f"ZeRO's partitions, so DeepSpeed runs take torch.optim.AdamW (the default); use FSDP2 or DDP "
                        f"for 8-bit AdamW (docs/scaling.md)")


def check_grad_accum(grad_accum: int) -> None:
    """DeepSpeed steps inside every backward (training's accelerator and a plan with plan.engine=zero2|zero3)."""
    if grad_accum > 1:
        raise UserError(f"train.grad_accum={grad_accum} under DeepSpeed: DeepSpeed steps its optimizer inside every "
                        f"backward unless it runs its own accumulation, which this toolkit does not drive; use "
                        f"train.grad_accum=1 with a larger train.batch_size, or DDP/FSDP (docs/scaling.md)")


def step(engine, loss: torch.Tensor) -> torch.Tensor:
    """backward → (clip) → optimizer step → zero the gradients, all by the engine; the norm before clipping."""
    engine.backward(loss)
    engine.step()
    norm = engine.get_global_grad_norm()
    return torch.tensor(float("nan") if norm is None else float(norm))


def written_back(model: torch.nn.Module):
    """A context in which `model`'s ZeRO-3 parameters are whole, and what is written into them is partitioned
    again on leaving (every process enters it); a no-op for any other model."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _torch_optimizer(engine):
    return engine.optimizer.optimizer  # ZeRO's optimizer wraps ours; its param groups hold the flat partitions


def _named_trained(engine):
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def master_weights(engines) -> dict[int, torch.Tensor]:
    """id(parameter) → its full fp32 master weight, for every trained parameter of `engines` (collective). Under
    bf16 the module holds bf16 copies; a checkpoint keeps the masters, so a resumed run continues unrounded."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {id(param): safe_get_full_fp32_param(param).detach().cpu().clone()
            for engine in engines for _, param in _named_trained(engine)}


def restore_master_weights(engines, modules: dict[str, torch.nn.Module], saved: dict[str, dict]) -> None:
    """Write a checkpoint's weights into the fp32 masters of `engines`' trained parameters: under bf16 the engine
    built its masters from the bf16 cast of the loaded weights (every process calls it)."""
    from deepspeed.utils import safe_set_full_fp32_param

    trained = {id(param) for engine in engines for _, param in _named_trained(engine)}
    for name, module in modules.items():
        for key, param in module.named_parameters():
            if id(param) in trained:
                safe_set_full_fp32_param(param, saved[name][key].float())


def optimizer_state_dict(engine) -> dict:
    """The full optimizer state of `engine`, keyed by parameter name as torch's `get_optimizer_state_dict` keys it
    (collective: every process calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = _torch_optimizer(engine)
    _create_optimizer_state(engine)  # a partition that never had a gradient has none yet: zero moments
    step = torch.tensor(max([float(s["step"]) for s in inner.state.values() if "step" in s], default=0.0))
    state = {}
    for name, param in _named_trained(engine):
        state[name] = {key: safe_get_full_optimizer_state(param, key).detach().cpu().clone() for key in ADAM_STATES}
        state[name]["step"] = step.clone()
    names = {id(param): name for name, param in _named_trained(engine)}
    zero = engine.optimizer
    members = getattr(zero, "bit16_groups", None) or zero.fp16_groups  # each group's parameters (ZeRO-1/2, ZeRO-3)
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in params]}
              for group, params in zip(inner.param_groups, members)]
    return {"state": state, "param_groups": groups}


def load_optimizer_state_dict(engine, saved: dict) -> None:
    """Scatter a full, parameter-name keyed optimizer state into the ZeRO partitions (every process calls it)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = _torch_optimizer(engine)
    _create_optimizer_state(engine)
    for name, param in _named_trained(engine):
        for key in ADAM_STATES:
            safe_set_full_optimizer_state(param, saved["state"][name][key].float(), key)
    step = next(iter(saved["state"].values()))["step"]
    for s in inner.state.values():
        if "step" in s:
            s["step"] = step.clone() if torch.is_tensor(s["step"]) else float(step)


def _create_optimizer_state(engine) -> None:
    """AdamW's state for every flat partition that has none, as its first step would create it (ZeRO-1/2 create it
    lazily, at that step, and only then link each parameter's fragment of it): a resumed run writes the saved
    moments into it."""
    inner = _torch_optimizer(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flats is None:
        flats = [flat for group in inner.param_groups for flat in group["params"]]
    for flat in flats:
        state = inner.state[flat]
        state.setdefault("step", torch.tensor(0.0))
        for key in ADAM_STATES:
            state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 (ZeRO-3 reads the state directly)
        zero._hp_optimizer_states_linked = False  # link again: a group without gradients so far had no state
        zero._lazy_init_hp_params_optimizer_state()
