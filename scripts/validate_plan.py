"""Check the planner against a measurement: predicted vs measured peak memory of real training steps on the CPU.

For each case, a fresh process loads the teacher, then builds the method and runs two real training steps;
the measured figure is the growth of the process's peak resident memory over what it held after loading
the teacher (glibc is told to give every large block straight back to the system, so resident memory
follows the live tensors). The prediction is `plan.simulate_step` on fake tensors for the same config,
every layer simulated, minus the teacher's own weights (which the measurement's baseline holds).

    python scripts/validate_plan.py [--out docs/results/real_scale/plan_validation.json] [--only dmd2]

The sharded cases run as 2 CPU processes under FSDP2 or DeepSpeed ZeRO-2/3 (`accelerate launch` with
conf/accelerate/cpu_fsdp2_2proc.yaml or cpu_deepspeed_zero{2,3}_2proc.yaml, gloo); each process measures itself
the same way, and the prediction is the planner's per-device figure (`sharding.per_device`, that engine,
2 devices) minus the teacher's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REAL = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
WIDE = ["model=pixart_sigma_512", "model.torch_dtype=float32", "train.batch_size=1"]
# DMD2's real images: zeros of the right shapes (the planner's own stand-in), so no folder is encoded
DMD2 = ["distill=dmd2", "distill.fake_updates_per_step=1", "~distill.gan.real_images.n",
        "distill.gan.real_images._target_=pixsig_distill.fake_step.BlankRealImages"]
DEEP = [*WIDE, "DEEP"]  # the 6-layer pipeline on a small canvas (main() puts its folder here)
CASES = {
    "toy dmd (batch 32)": ["model=toy"],
    "toy lcm (batch 32)": ["model=toy", "distill=lcm"],
    "Σ-512 width, 2 layers, dmd": WIDE,
    "Σ-512 width, 2 layers, dmd, checkpointing": [*WIDE, "train.gradient_checkpointing=true"],
    "Σ-512 width, 2 layers, dmd, LoRA fake + generator (r 64), EMA off": [
        *WIDE, "distill.fake_score.lora_rank=64", "distill.generator.lora_rank=64", "distill.ema_decay=null"],
    "Σ-512 width, 2 layers, dmd2 (GAN head, blank real images)": [*WIDE, *DMD2],
    "Σ-512 width, 2 layers, dmd2, LoRA fake (r 64), checkpointing": [
        *WIDE, *DMD2, "distill.fake_score.lora_rank=64", "train.gradient_checkpointing=true"],
    "Σ-512 width, 2 layers, lcm (batch 2)": [*WIDE, "distill=lcm", "train.batch_size=2"],
    "Σ-512 width, 2 layers, lcm_lora (batch 2)": [*WIDE, "distill=lcm_lora", "train.batch_size=2"],
}
# Sharded over 2 CPU processes: (engine, overrides); train.batch_size is per process.
SHARDED = {
    "Σ-512 width, 2 layers, dmd, FSDP2 × 2": ("fsdp2", WIDE),
    "Σ-512 width, 2 layers, dmd, FSDP2 × 2, checkpointing": ("fsdp2", [*WIDE, "train.gradient_checkpointing=true"]),
    "Σ-512 width, 2 layers, lcm (batch 2), FSDP2 × 2": ("fsdp2", [*WIDE, "distill=lcm", "train.batch_size=2"]),
    "Σ-512 width, 2 layers, dmd, ZeRO-2 × 2": ("zero2", WIDE),
    "Σ-512 width, 2 layers, dmd, ZeRO-3 × 2": ("zero3", WIDE),
    "Σ-512 width, 2 layers, dmd, ZeRO-3 × 2, checkpointing": ("zero3", [*WIDE, "train.gradient_checkpointing=true"]),
    "Σ-512 width, 2 layers, lcm (batch 2), ZeRO-3 × 2": ("zero3", [*WIDE, "distill=lcm", "train.batch_size=2"]),
    # Deeper than ZeRO-3's shipped live-parameter limits (deepspeed_zero3.json): 6 blocks at Σ-512 width, on a
    # 16 × 16 latent canvas (the parameters, not the activations, are what the limits act on).
    "Σ-512 width, 6 layers, 128 px, dmd, ZeRO-2 × 2": ("zero2", DEEP),
    "Σ-512 width, 6 layers, 128 px, dmd, ZeRO-3 × 2, DeepSpeed's default limits": ("zero3_defaults", DEEP),
    "Σ-512 width, 6 layers, 128 px, dmd, ZeRO-3 × 2": ("zero3", DEEP),
    "Σ-512 width, 6 layers, 128 px, lcm (batch 2), ZeRO-3 × 2": ("zero3", [*DEEP, "distill=lcm", "train.batch_size=2"]),
}
LAUNCH_CONFIGS = {engine: Path(__file__).resolve().parents[1] / "pixsig_distill" / "conf" / "accelerate" / name
                  for engine, name in [("fsdp2", "cpu_fsdp2_2proc.yaml"), ("zero2", "cpu_deepspeed_zero2_2proc.yaml"),
                                       ("zero3", "cpu_deepspeed_zero3_2proc.yaml")]}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        return hydra_compose("plan", overrides=["eval=none", "device=cpu", "model.load_text_encoder=false",
                                                *overrides])


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(overrides: list[str], sharded: bool = False) -> dict:
    """In this (fresh) process: bytes the training state adds at its peak over the loaded teacher. `sharded`: this
    process is one of a sharded launch (its accelerator comes from the launch, as in training)."""
    import gc

    import torch
    from accelerate import Accelerator

    from pixsig_distill.config import build
    from pixsig_distill.distributed import make_accelerator

    torch.manual_seed(0)
    cfg = compose(overrides)
    accelerator = make_accelerator("cpu", cfg.train.mixed_precision, 1, cfg.train.batch_size) if sharded else \
        Accelerator(cpu=True)
    teacher = build(cfg.model)
    from pixsig_distill.architectures import architecture_of

    arch = architecture_of(cfg.model.pretrained, cfg.model.max_sequence_length)
    # Weights loaded from safetensors may still be file pages that only become resident when first read: read
    # them all now, so that the baseline holds the whole teacher.
    with torch.no_grad():
        for module in (teacher.transformer, teacher.vae, teacher.pipe.text_encoder):
            for t in (*module.parameters(), *module.buffers()) if module is not None else ():
                t.sum()
    gc.collect()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    method = build(cfg.distill, teacher=teacher)
    method.prepare(accelerator)
    batch = {k: (torch.randn(v.shape, dtype=v.dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in _real_batch(cfg, teacher, arch).items()}
    teacher.set_null_embedding(torch.randn(1, arch.max_sequence_length, arch.transformer["caption_channels"]),
                               torch.ones(1, arch.max_sequence_length, dtype=torch.long))
    began = time.time()
    for step in range(2):
        method.train_step(batch, torch.Generator().manual_seed(step), cfg.train.grad_accum)
    return {"measured_bytes": _status("VmHWM") - baseline, "step_seconds": (time.time() - began) / 2,
            "rank": accelerator.process_index}


def _real_batch(cfg, teacher, arch) -> dict:
    """The batch the planner simulates (plan._fake_batch), with values."""
    import torch

    n = cfg.train.batch_size * cfg.train.grad_accum
    width = arch.transformer["caption_channels"]
    return {"embeds": torch.randn(n, arch.max_sequence_length, width, dtype=teacher.dtype),
            "mask": torch.ones(n, arch.max_sequence_length, dtype=torch.long),
            "latents": torch.randn(teacher.latent_shape(n)), "prompt": ["a prompt"] * n}


def predict(overrides: list[str], gpus: int = 1, engine: str = "fsdp2") -> dict:
    from dataclasses import asdict

    from pixsig_distill.fake_step import shape_only_teacher, simulate_step
    from pixsig_distill.sharding import per_device, sharded_networks, zero3_limits

    cfg = compose(overrides)
    segments: list = []
    step = simulate_step(cfg, None, segments=segments)
    sharded = sharded_networks(cfg)
    limits = zero3_limits() if engine == "zero3" else None  # zero3_defaults: DeepSpeed's own (None)
    device = max((per_device(asdict(s), sharded, engine.replace("_defaults", ""), gpus, cfg.train.mixed_precision,
                             limits) for s in segments or [step]), key=lambda d: d["peak"])
    teacher, _ = shape_only_teacher(cfg.model)
    frozen = sum(p.numel() * p.element_size() for m in (teacher.transformer, teacher.vae) for p in m.parameters())
    return {"predicted_bytes": device["peak"] - frozen, "predicted_total_bytes": device["peak"],
            "predicted_split": {k: v for k, v in step.__dict__.items()},
            **({"predicted_sharding": {k: v for k, v in device.items() if k != "peak"}} if gpus > 1 else {})}


def measure_sharded(overrides: list[str], env: dict, engine: str) -> dict:
    """The 2 processes of a launch with `engine`, each measuring itself: the larger of their figures."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_launch_config(engine)),
                           "--main_process_port", port, __file__, "--sharded-worker", *overrides],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=True)
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"measured_bytes": max(r["measured_bytes"] for r in ranks),
            "step_seconds": max(r["step_seconds"] for r in ranks), "ranks": ranks}


def _launch_config(engine: str) -> Path:
    """The shipped CPU config of `engine`; zero3_defaults: the ZeRO-3 one with DeepSpeed's default limits."""
    if engine != "zero3_defaults":
        return LAUNCH_CONFIGS[engine]
    folder = Path(tempfile.mkdtemp())
    shipped = json.loads((LAUNCH_CONFIGS["zero3"].parent / "deepspeed_zero3.json").read_text())
    for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
                "reduce_bucket_size"):
        shipped["zero_optimization"].pop(key)
    (folder / "zero3.json").write_text(json.dumps(shipped))
    config = LAUNCH_CONFIGS["zero3"].read_text().replace("pixsig_distill/conf/accelerate/deepspeed_zero3.json",
                                                         str(folder / "zero3.json"))
    (folder / "zero3.yaml").write_text(config)
    return folder / "zero3.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/real_scale/plan_validation.json")
    parser.add_argument("--only", help="run only the cases whose name contains this text; the other rows of --out "
                                        "are kept")
    parser.add_argument("--predict-only", action="store_true", help="recompute the predictions of the rows in --out "
                        "(after a change to the planner), keeping their measurements")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--sharded-worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.worker)))
        return
    if args.sharded_worker is not None:
        print(json.dumps(measure(args.sharded_worker, sharded=True)), flush=True)
        return
    from pixsig_distill.architectures import random_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sigma512_2layers"
        random_pipeline(REAL, num_layers=2).save_pretrained(folder, safe_serialization=True)
        deep = Path(tmp) / "sigma512_6layers_128px"
        for name, overrides in {**CASES, **{name: overrides for name, (_, overrides) in SHARDED.items()}}.items():
            if args.only is not None and args.only not in name:
                continue
            if "DEEP" in overrides:
                if not deep.exists():
                    random_pipeline(REAL, num_layers=6, sample_size=16).save_pretrained(deep, safe_serialization=True)
                overrides = [o for o in overrides if o != "DEEP"] + [f"model.pretrained={deep}",
                                                                     "model.max_sequence_length=300"]
            elif "model=pixart_sigma_512" in overrides:
                overrides = [*overrides, f"model.pretrained={folder}", "model.max_sequence_length=300"]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            if args.predict_only:
                old = next((r for r in json.loads(Path(args.out).read_text())["rows"] if r["case"] == name), None)
                if old is None:
                    continue
                measured = {k: old[k] for k in ("measured_bytes", "step_seconds", "ranks") if k in old}
                predicted = predict(overrides, *((2, SHARDED[name][0]) if name in SHARDED else ()))
            elif name in SHARDED:
                engine = SHARDED[name][0]
                measured, predicted = measure_sharded(overrides, env, engine), predict(overrides, 2, engine)
            else:
                done = subprocess.run([sys.executable, __file__, "--worker", *overrides], env=env,
                                      capture_output=True, text=True, check=True)
                measured, predicted = json.loads(done.stdout.strip().splitlines()[-1]), predict(overrides)
            ratio = predicted["predicted_bytes"] / measured["measured_bytes"]
            rows.append({"case": name, "overrides": overrides, **measured, **predicted, "ratio": ratio})
            print(f"{name}: predicted {predicted['predicted_bytes'] / 2**20:.0f} MiB, measured "
                  f"{measured['measured_bytes'] / 2**20:.0f} MiB (×{ratio:.2f})", flush=True)
    if (args.only is not None or args.predict_only) and Path(args.out).is_file():  # the other rows, as they were
        ran = {r["case"] for r in rows}
        rows += [r for r in json.loads(Path(args.out).read_text())["rows"] if r["case"] not in ran]
        order = [*CASES, *SHARDED]
        rows.sort(key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": __import__("torch").__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
