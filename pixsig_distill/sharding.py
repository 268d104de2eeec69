"""What one device holds when a training step is split over several (`plan.gpus`, `plan.engine`): PREDICTED from
the one-device step the planner simulates (fake_step.py), validated against 2-process FSDP2 and DeepSpeed CPU runs
(scripts/validate_plan.py, docs/scaling.md)."""

from __future__ import annotations

from omegaconf import DictConfig

from .config import build
from .fake_step import shape_only_teacher
from .plan_config import plannable

ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


# DeepSpeed's own values of the ZeRO-3 limits a config leaves out (deepspeed/runtime/zero/config.py), in parameters.
DEEPSPEED_DEFAULT_LIMITS = {"stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                            "stage3_prefetch_bucket_size": 5e7}


ZERO3_GATHERED = 2.3  # bytes a ZeRO-3 device holds per byte of parameters gathered (FITTED, docs/scaling.md)


def zero3_limits(deepspeed_config: str | None = None) -> dict:
    """The live-parameter limits of a ZeRO-3 run: those of the DeepSpeed JSON `deepspeed_config` (None: the shipped
    conf/accelerate/deepspeed_zero3.json), DeepSpeed's defaults for what it leaves out."""
    import json
    from pathlib import Path

    from .config import PACKAGE_DIR
    from .errors import UserError

    path = Path(deepspeed_config or PACKAGE_DIR / "conf" / "accelerate" / "deepspeed_zero3.json")
    try:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
    except (OSError, ValueError) as err:
        raise UserError(f"plan.deepspeed_config='{path}' is not a readable DeepSpeed JSON ({err}); give the file "
                        f"your launch config names as deepspeed_config_file") from None
    return {key: float(zero.get(key, default)) for key, default in DEEPSPEED_DEFAULT_LIMITS.items()}


def per_device(step: dict, sharded: dict, engine: str, gpus: int, mixed_precision: str,
               limits: dict | None = None) -> dict:
    """The peak one device holds when the step runs on `gpus` devices with `engine` (PREDICTED), from the one-device
    step's figures at its peak and the bytes of the networks training prepares (`sharding.sharded_networks`):

    * ddp: everything replicated, plus DDP's gradient buckets, a second copy of the gradients;
    * zero2: gradients and optimizer state split over the devices (ZeRO stage 2);
    * fsdp2: the prepared networks' parameters split too, and two of their units (one transformer block, in bf16
      when training in mixed precision) gathered whole at a time: the one computing and the one prefetched;
    * zero3: as zero2, with the prepared networks' parameters split over the devices too, plus what each of them
      holds gathered at a time: `ZERO3_GATHERED` times (the gathered copies, their partition and communication
      buffers) the smaller of its bytes and the parameters its live-parameter `limits` let it hold
      (`stage3_max_live_parameters` + `stage3_prefetch_bucket_size`; None: DeepSpeed's defaults, 1e9 + 5e7, which
      exceed these networks: what a forward gathers stays gathered until its backward, and ZeRO-3 holds more than
      ZeRO-2). The factor is FITTED to 2-process CPU measurements of DMD under the defaults and the shipped limits
      and checked on LCM and on checkpointed DMD (docs/scaling.md).

    DeepSpeed (zero2, zero3) also keeps, whatever the precision, an fp32 master copy of the trained parameters and
    their reduced fp32 gradients, each split over the devices (`masters`).

    The frozen teacher, an EMA and the activations stay whole on every device."""
    peak, share = step["peak"], 1 - 1 / gpus
    parts = {"sharded_away": 0.0, "gathered": 0.0, "buckets": 0.0, "masters": 0.0}
    if gpus > 1:
        if engine == "ddp":
            parts["buckets"] = step["grads"]
        else:
            parts["sharded_away"] = share * (step["grads"] + step["optimizer"])
        half = 0.5 if mixed_precision in ("bf16", "fp16") else 1.0
        if engine == "fsdp2":
            parts["sharded_away"] += share * sharded["bytes"]
            parts["gathered"] = 2 * sharded["unit"] * half
        if engine == "zero3":
            limits = limits or DEEPSPEED_DEFAULT_LIMITS
            held = limits["stage3_max_live_parameters"] + limits["stage3_prefetch_bucket_size"]
            per_network = sharded.get("per_network") or {"all": (sharded["bytes"] / 4, sharded["bytes"])}
            parts["sharded_away"] += share * sharded["bytes"]
            parts["gathered"] = ZERO3_GATHERED * half * sum(min(size, held * size / max(count, 1))
                                                            for count, size in per_network.values())
        if engine in ("zero2", "zero3"):
            parts["masters"] = 2 * sharded["trained_fp32"] / gpus
    return {"peak": peak - parts["sharded_away"] + parts["gathered"] + parts["buckets"] + parts["masters"], **parts,
            "sharded_networks": sharded["networks"], "sharded_bytes": sharded["bytes"], "unit_bytes": sharded["unit"]}


def check_engine(cfg: DictConfig, engine: str) -> None:
    """Whatever training refuses under `engine`, a plan refuses too: DeepSpeed's rules (`check_deepspeed_rules`),
    then the method's own `check_engine`, on its networks built on the meta device (nothing allocated)."""
    check_deepspeed_rules(cfg, engine)
    cfg = plannable(cfg)
    teacher, _ = shape_only_teacher(cfg.model, num_layers=1)
    method = build(cfg.distill, teacher=teacher)
    method.check_engine(engine)


def check_deepspeed_rules(cfg: DictConfig, engine: str) -> None:
    """Under zero2/zero3: AdamW only and no train.grad_accum (deepspeed_engines.py: what training refuses)."""
    if engine not in ("zero2", "zero3"):
        return
    from .config_checks import target_nodes
    from .deepspeed_engines import check_grad_accum, check_optimizer

    check_grad_accum(int(cfg.train.grad_accum))
    for path, _, target in target_nodes(cfg._get_node("distill"), "distill"):
        if path.endswith("optimizer"):
            check_optimizer(target)


def sharded_networks(cfg: DictConfig) -> dict:
    """What a sharding engine splits across devices, at full depth on the meta device (nothing allocated): the
    bytes of the networks training prepares (`method.models`: their parameters, trained or frozen inside them) and
    the largest of their units, one transformer block, which FSDP2 / ZeRO-3 gather whole for its forward and
    backward."""
    cfg = plannable(cfg)
    teacher, _ = shape_only_teacher(cfg.model)
    method = build(cfg.distill, teacher=teacher)
    params = {id(p): p for network in method.models.values() for p in network.parameters()}
    unit = max((sum(p.numel() * p.element_size() for p in block.parameters())
                for network in method.models.values() for name, block in network.named_modules()
                if name.endswith("transformer_blocks.0")), default=0)
    trained = sum(p.numel() for p in params.values() if p.requires_grad)
    per_network = {name: (float(sum(p.numel() for p in network.parameters())),
                          float(sum(p.numel() * p.element_size() for p in network.parameters())))
                   for name, network in method.models.items()}  # (parameters, bytes): ZeRO-3's limits count them
    return {"bytes": float(sum(p.numel() * p.element_size() for p in params.values())), "unit": float(unit),
            "trained_fp32": 4.0 * trained, "networks": sorted(method.models), "per_network": per_network}
