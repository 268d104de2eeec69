"""`python -m pixsig_distill.plan <the overrides of a train command>`: will this run fit, and how long will it take?

Composes the very same config as `train`, builds the method's networks without weights (on the meta device),
turns every weight into a fake tensor (torch's FakeTensorMode: shapes and dtypes, no storage) and runs complete
training steps — every forward and backward pass and optimizer step the method makes — under torch's memory
tracker (`torch.distributed._tools.mem_tracker.MemTracker`) and FLOP counter. It prints the predicted peak
memory of one device split into parameters, gradients, optimizer state and activations, and the FLOPs of a
step; with `plan.gpu=h100|h200|a100|l40s|4090`, a roofline estimate of the step time and of 1-step and
20-step generation latency per part (T5, transformer, decoder; `plan.vae=tiny` and `plan.prompt_tokens=N` for
a tiny decoder and trimmed prompts: pixsig_distill/plan_latency.py). Everything it prints is a PREDICTION
(docs/real_scale.md has the measurements that validate it).

To stay fast on a CPU, it simulates the transformer at two small depths and extrapolates linearly to the real
depth (parameters, gradients, optimizer state, activations and FLOPs of identical blocks add up);
`plan.exact=true` simulates every layer.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import UserError
from .fake_step import predict_step
from .plan_latency import (INFER_MFU, QUANTIZED_SHARE, check_generation_options, format_generation,  # noqa: F401
                           generation_flops, generation_memory, generation_report, inference_memory,
                           roofline_latency)
from .plan_config import plan_notes
from .sharding import ENGINES, check_engine, per_device, sharded_networks, zero3_limits
from .console import entry_point

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float      # device memory as the driver reports it
    bf16_flops: float      # dense bf16 tensor-core peak, FLOP/s
    bandwidth: float       # memory bandwidth, bytes/s

    def fits(self, peak_bytes: float) -> bool:
        """Leave a tenth for the CUDA context, the allocator's fragmentation and communication buffers."""
        return peak_bytes <= FIT_SHARE * self.memory_gib * GiB


FIT_SHARE = 0.9
GPUS = {  # vendor datasheet peaks (dense, no sparsity); memory as nvidia-smi reports it
    "h100": GPU("NVIDIA H100 SXM 80GB", 79.6, 989e12, 3.35e12),
    "h200": GPU("NVIDIA H200 SXM 141GB", 140.4, 989e12, 4.8e12),
    "a100": GPU("NVIDIA A100 SXM 80GB", 80.0, 312e12, 2.04e12),
    "l40s": GPU("NVIDIA L40S 48GB", 45.0, 362e12, 0.864e12),
    "4090": GPU("NVIDIA GeForce RTX 4090 24GB", 24.0, 165e12, 1.008e12),
}
TRAIN_MFU = 0.4      # share of the peak a well-tuned training step reaches (a typical figure, not a measurement)
# ---- the report --------------------------------------------------------------------------------

def validate(cfg: DictConfig) -> None:
    """What train refuses (but a plan may size random-weight stand-ins and fp16 on a GPU it does not have), and
    the plan's own options."""
    from .config import validate_train_config

    validate_train_config(cfg, check_resume=False, training=False)  # a plan writes nothing and resumes nothing
    gpu_name = None if cfg.plan.gpu is None else str(cfg.plan.gpu)  # `plan.gpu=4090` arrives as an integer
    if gpu_name is not None and gpu_name not in GPUS:
        raise UserError(f"plan.gpu={gpu_name!r}; use one of {', '.join(GPUS)} (or null for memory only)")
    check_plan_options(cfg.plan, cfg.model)


def plan(cfg: DictConfig) -> dict:
    validate(cfg)
    options = cfg.plan
    gpu_name = None if options.gpu is None else str(options.gpu)
    began = time.time()
    gpus, engine = int(options.gpus), str(options.engine or "ddp")
    check_engine(cfg, engine)  # before minutes of simulation
    step, layers, device = predict_device(cfg, engine, gpus)
    report = {"prediction": True, "model": str(cfg.model.pretrained), "layers": layers,
              "method": OmegaConf.select(cfg, "distill._target_"),
              "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
              "mixed_precision": cfg.train.mixed_precision, "gradient_checkpointing": cfg.train.gradient_checkpointing,
              "step": {k: v for k, v in asdict(step).items()}, "simulated_exactly": bool(options.exact),
              "gpus": gpus, "engine": engine if gpus > 1 else None, "per_device": device,
              "notes": []}
    report["notes"] += plan_notes(cfg)  # what each configured object says the plan leaves out
    if device.get("zero2_peak") is not None and device["peak"] >= device["zero2_peak"]:
        held = device["limits"]["stage3_max_live_parameters"] + device["limits"]["stage3_prefetch_bucket_size"]
        report["notes"].append(
            f"ZeRO-3 holds {device['peak'] / GiB:.2f} GiB per device, no less than ZeRO-2's "
            f"{device['zero2_peak'] / GiB:.2f}: its live-parameter limits ({held:.3g} parameters live and prefetched) "
            f"let each network stay gathered whole; lower stage3_max_live_parameters and stage3_prefetch_bucket_size "
            f"in its DeepSpeed JSON (plan.deepspeed_config=) or use plan.engine=fsdp2 or zero2")
    if gpu_name is not None:
        gpu = GPUS[gpu_name]
        report["gpu"] = {"name": gpu.name, "memory_gib": gpu.memory_gib, "fits": gpu.fits(device["peak"]),
                         "step_seconds_at_peak": step.flops / gpu.bf16_flops,
                         "step_seconds": step.flops / (gpu.bf16_flops * TRAIN_MFU), "train_mfu": TRAIN_MFU,
                         **generation_report(cfg, gpu)}
    if options.get("inference"):
        guided = float(cfg.model.get("guidance_scale", 1.0)) > 1
        report["inference_memory"] = {"resolution": cfg.model.get("resolution"), "guided": guided,
                                      "decoder": str(options.get("vae", "full")),
                                      "prompt_tokens": options.get("prompt_tokens"),
                                      "modes": inference_memory(generation_memory(cfg, guided))}
    if options.get("fit") is not None:
        report["fit"] = advise_fit(cfg, str(options.fit), gpus, engine)
    report["planner_seconds"] = time.time() - began
    print(format_report(report))
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=1))
    return report


def predict_device(cfg: DictConfig, engine: str, gpus: int):
    """The one-device step, its layer count, and one device's figures on `gpus` devices with `engine`."""
    options = cfg.plan
    segments: list = []
    step, layers = predict_step(cfg, tuple(options.depths), options.exact, segments)
    sharded = sharded_networks(cfg)
    limits = zero3_limits(options.get("deepspeed_config")) if engine == "zero3" else None

    def on_device(engine_: str) -> dict:  # each segment's peak as the device holds it: the largest is the device's
        return max((per_device(asdict(s), sharded, engine_, gpus, cfg.train.mixed_precision, limits)
                    for s in segments or [step]), key=lambda d: d["peak"])

    device = on_device(engine)
    if engine == "zero3" and gpus > 1:  # what ZeRO-3 buys over ZeRO-2 with these limits, for the report's note
        device["zero2_peak"], device["limits"] = on_device("zero2")["peak"], limits
    return step, layers, device


# Memory savers every method has, cheapest first; a method adds its own (its class's MEMORY_SAVERS).
GENERIC_SAVERS = [("bf16 autocast", {"train.mixed_precision": "bf16"}),
                  ("gradient checkpointing (≈ +30 % step time)", {"train.gradient_checkpointing": True})]


def advise_fit(cfg: DictConfig, gpu_name: str, gpus: int, engine: str) -> dict:
    """`plan.fit=<gpu>`: the cheapest memory savers that make the step fit one such device, cheapest first —
    bf16 autocast, checkpointing, then the method's own (its class's `MEMORY_SAVERS`: a LoRA fake score, 8-bit AdamW, an EMA on the
    CPU, ...), then sharding when there are several devices — and the largest batch per device that fits with them,
    as overrides to paste, with the predicted step time. PREDICTED, like the rest of the plan."""
    from hydra.utils import get_class

    if gpu_name not in GPUS:
        raise UserError(f"plan.fit={gpu_name!r}; use one of {', '.join(GPUS)}")
    gpu = GPUS[gpu_name]
    budget = FIT_SHARE * gpu.memory_gib * GiB
    method_savers = get_class(cfg.distill._target_).MEMORY_SAVERS  # methods/base.py: {} unless the method has some
    savers = [*GENERIC_SAVERS, *method_savers.items()]
    if gpus > 1 and engine == "ddp":
        savers.append(("sharding the trained networks (FSDP2: accelerate launch --config_file "
                       "pixsig_distill/conf/accelerate/fsdp2_full_shard.yaml)", {"plan.engine": "fsdp2"}))
    chosen, used = {}, []

    def device_peak(batch: int):
        trial = copy.deepcopy(cfg)
        with open_dict(trial):
            for key, value in {**chosen, "train.batch_size": batch}.items():
                if key != "plan.engine":
                    OmegaConf.update(trial, key, value, force_add=True)
        step, _, device = predict_device(trial, str(chosen.get("plan.engine", engine)), gpus)
        return device["peak"], step.flops

    peak1, flops1 = device_peak(1)
    for name, changes in savers:
        if peak1 <= budget:
            break
        if all(OmegaConf.select(cfg, key, default=None) == value for key, value in changes.items()):
            continue  # already on
        if refused_under(cfg, {**chosen, **changes}, engine):
            continue  # training would refuse it under this engine (8-bit AdamW under DeepSpeed)
        chosen.update(changes)
        used.append(name)
        peak1, flops1 = device_peak(1)
    advice = {"gpu": gpu.name, "budget_bytes": budget, "savers": used,
              "overrides": [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                            for key, value in chosen.items()], "fits": peak1 <= budget, "peak_at_batch_1": peak1}
    if not advice["fits"]:
        return advice
    peak2, flops2 = device_peak(2)
    per_sample = max(peak2 - peak1, 1.0)
    batch = max(1, int((budget - peak1) // per_sample) + 1)
    advice.update(batch_size=batch, overrides=[*advice["overrides"], f"train.batch_size={batch}"],
                  peak=peak1 + (batch - 1) * per_sample,
                  step_seconds=(flops1 + (batch - 1) * (flops2 - flops1)) / (gpu.bf16_flops * TRAIN_MFU))
    return advice


def refused_under(cfg: DictConfig, changes: dict, engine: str) -> bool:
    """Would training refuse `cfg` with `changes` under `engine` for DeepSpeed's rules (sharding.py)?"""
    from .sharding import check_deepspeed_rules

    trial = copy.deepcopy(cfg)
    with open_dict(trial):
        for key, value in changes.items():
            if key != "plan.engine":
                OmegaConf.update(trial, key, value, force_add=True)
    try:
        check_deepspeed_rules(trial, str(changes.get("plan.engine", engine)))
    except UserError:
        return True
    return False


def check_plan_options(options: DictConfig, model_cfg: DictConfig | None = None) -> None:
    """plan.depths, plan.gpus, plan.engine, plan.vae, plan.prompt_tokens and plan.out, refused in one line before
    minutes of simulation."""
    if isinstance(options.gpus, bool) or not isinstance(options.gpus, int) or options.gpus < 1:
        raise UserError(f"plan.gpus={options.gpus!r}; give the number of devices, e.g. plan.gpus=8")
    if options.get("fit") is not None and str(options.fit) not in GPUS:
        raise UserError(f"plan.fit={options.fit!r}; use one of {', '.join(GPUS)}")
    if options.engine is not None and str(options.engine) not in ENGINES:
        raise UserError(f"plan.engine={options.engine!r}; use one of {', '.join(ENGINES)}")
    if str(options.engine) == "zero3":
        zero3_limits(options.get("deepspeed_config"))  # a DeepSpeed JSON that reads, before simulating
    check_generation_options(options, model_cfg)
    depths = options.depths
    if not (OmegaConf.is_list(depths) and len(depths) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in depths)
            and depths[0] != depths[1]):
        raise UserError(f"plan.depths={OmegaConf.to_container(depths) if OmegaConf.is_list(depths) else depths!r}; "
                        f"give two different transformer depths >= 1 to extrapolate from, e.g. plan.depths=[1,2]")
    if options.out:
        from .config import writable_folder_error

        out = Path(str(options.out)).expanduser()
        problem = "it is a folder" if out.is_dir() else writable_folder_error(out.parent)
        if problem:
            raise UserError(f"plan.out='{options.out}' cannot be written ({problem}); choose a file in a writable "
                            f"folder, e.g. plan.out=plan.json")


def format_report(report: dict) -> str:
    s = report["step"]
    lines = [f"PREDICTED (fake tensors, not measured) — {report['method']} on {report['model']} "
             f"({report['layers']} layers), batch {report['batch_size']} × accum {report['grad_accum']}, "
             f"mixed precision {report['mixed_precision']}, checkpointing {report['gradient_checkpointing']}",
             f"  peak memory on one device: {s['peak'] / GiB:.2f} GiB  "
             f"(parameters {s['params'] / GiB:.2f}, gradients {s['grads'] / GiB:.2f}, "
             f"optimizer state {s['optimizer'] / GiB:.2f}, activations {s['activations'] / GiB:.2f}, "
             f"EMA and batch {s['other'] / GiB:.2f} at the peak)",
             f"  FLOPs of one training step: {s['flops'] / 1e12:.1f} TFLOP"]
    if report.get("gpus", 1) > 1:
        d = report["per_device"]
        lines.append(f"  on {report['gpus']} devices with {report['engine']}: {d['peak'] / GiB:.2f} GiB per device "
                     f"({d['sharded_away'] / GiB:.2f} split away, {d['gathered'] / GiB:.2f} gathered at a time, "
                     f"{d['buckets'] / GiB:.2f} gradient buckets, {d['masters'] / GiB:.2f} DeepSpeed fp32 masters and "
                     f"gradients; sharded: {', '.join(d['sharded_networks'])}); "
                     f"train.batch_size is per device")
    if "gpu" in report:
        g = report["gpu"]
        lines += [f"  on {g['name']}: {'fits' if g['fits'] else 'does NOT fit'} in {FIT_SHARE:.0%} of its "
                  f"{g['memory_gib']:.0f} GiB; step "
                  f"≈ {g['step_seconds']:.2f} s at {g['train_mfu']:.0%} MFU (≥ {g['step_seconds_at_peak']:.2f} s at peak)",
                  *format_generation(g)]
    if "inference_memory" in report:
        inference = report["inference_memory"]
        lean = (", tiny decoder" if inference.get("decoder") == "tiny" else "") + (
            f", {inference['prompt_tokens']} prompt tokens" if inference.get("prompt_tokens") else "")
        guided = ", CFG" if inference["guided"] else ""
        lines.append(f"  generation, peak device memory by inference mode (batch 1{guided}{lean}):")
        lines += [f"    {name:34s} {value / GiB:6.2f} GiB" for name, value in inference["modes"].items()]
    if "fit" in report:
        f = report["fit"]
        if not f["fits"]:
            lines.append(f"  plan.fit: does NOT fit one {f['gpu']} even at batch 1 with every saver "
                         f"({', '.join(f['savers']) or 'none left'}): {f['peak_at_batch_1'] / GiB:.1f} GiB; "
                         f"use more devices (plan.gpus=N) or a larger GPU")
        else:
            lines.append(f"  plan.fit on {f['gpu']}: batch {f['batch_size']} per device fits "
                         f"({f['peak'] / GiB:.1f} of {f['budget_bytes'] / GiB:.1f} GiB usable), step ≈ "
                         f"{f['step_seconds']:.2f} s at {TRAIN_MFU:.0%} MFU; savers: {', '.join(f['savers']) or 'none needed'}")
            lines.append(f"    paste: {' '.join(f['overrides'])}")
    lines += [f"  note: {n}" for n in report["notes"]]
    how = "every layer simulated" if report["simulated_exactly"] else "two depths simulated, extrapolated per layer"
    lines.append(f"  ({how}; planned in {report['planner_seconds']:.0f} s)")
    return "\n".join(lines)


main = entry_point("plan", plan, needs_values=False, validate=validate)  # a plan reads no data: folders may stay unset


if __name__ == "__main__":
    main()
