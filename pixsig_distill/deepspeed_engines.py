"""DeepSpeed ZeRO under accelerate: one engine per trained network, stepped by the methods themselves.

accelerate's DeepSpeed integration drives one engine through `accelerator.backward` (it steps the engine it
prepared first). DMD trains two networks, the generator and the fake score, so each trained network here is its
own engine (`prepare`) and a method's update calls that engine's backward and step (`step`), as DeepSpeed's own
training loops do. DeepSpeed clips by its config: the method's `grad_clip` is written there before the engine is
built.

Checkpoints stay safetensors: the optimizer state is gathered from the ZeRO partitions per parameter
(`safe_get_full_optimizer_state`, a collective) into the same parameter-name keyed form the DDP and FSDP2 runs
save, and scattered back on resume, so a ZeRO run resumes with its AdamW moments, even on another process count.
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def is_deepspeed(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED


def prepare(accelerator, model: torch.nn.Module, optimizer, grad_clip: float | None):
    """`accelerator.prepare(model, optimizer)`; under DeepSpeed an engine of its own for this network."""
    if not is_deepspeed(accelerator):
        return accelerator.prepare(model, optimizer)
    accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = float(grad_clip or 0.0)
    engine, optimizer = accelerator.prepare(model, optimizer)
    accelerator.deepspeed_engine_wrapped = None  # every engine is stepped by `step`, not accelerator.backward
    return engine, optimizer


def step(engine, loss: torch.Tensor) -> torch.Tensor:
    """backward → (clip) → optimizer step → zero the gradients, all by the engine; the norm before clipping."""
    engine.backward(loss)
    engine.step()
    norm = engine.get_global_grad_norm()
    return torch.tensor(float("nan") if norm is None else float(norm))


def _torch_optimizer(engine):
    return engine.optimizer.optimizer  # ZeRO's optimizer wraps ours; its param groups hold the flat partitions


def _named_trained(engine):
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def optimizer_state_dict(engine) -> dict:
    """The full optimizer state of `engine`, keyed by parameter name as torch's `get_optimizer_state_dict` keys it
    (collective: every process calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = _torch_optimizer(engine)
    steps = [s["step"] for s in inner.state.values() if "step" in s]
    step = torch.as_tensor(steps[0] if steps else 0.0, dtype=torch.float32).clone()
    state = {}
    for name, param in _named_trained(engine):
        state[name] = {key: safe_get_full_optimizer_state(param, key).detach().cpu().clone() for key in ADAM_STATES}
        state[name]["step"] = step.clone()
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [name for name, _ in
                                                                              _named_trained(engine)]}
              for group in inner.param_groups[:1]]
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
    """AdamW's state for every flat partition, as its first step would create it (ZeRO-1/2 create it lazily, at that
    step, and only then link each parameter's fragment of it): a resumed run writes the saved moments into it."""
    inner = _torch_optimizer(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flats is None:
        flats = [flat for group in inner.param_groups for flat in group["params"]]
    for flat in flats:
        state = inner.state[flat]
        state.setdefault("step", torch.tensor(0.0))
        for key in ADAM_STATES:
            state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2; ZeRO-3 reads state
    if link is not None:
        link()
