"""Latency, memory and DMD training cost of PixArt-Σ at its real size, with random weights.

    python scripts/benchmark.py --out docs/results/benchmark                      # GPU: Σ 512 and 1024
    python scripts/benchmark.py --config toy --out /tmp/bench                     # CPU, toy size, < 1 min

Nothing is downloaded: every network is built from its published configuration with random weights,
directly on the device and in the dtype it is measured in (time and memory do not depend on the
values). The components are the published configurations in pixsig_distill/architectures.py: the
PixArt-Σ XL/2 transformer (sample size 64 at 512 px, 128 at 1024 px), the T5 v1.1 XXL encoder at 300
tokens (with a local word-level tokenizer: the encoder always sees 300 padded tokens) and the SDXL VAE.

Measured per configuration (`--config toy` runs the same on the toy components, fp32 on CPU):

- latency with `evaluation/latency.py` (batch 1, warm-up, device sync around every run, median and
  p90): end-to-end (prompt → image: T5, the transformer steps, VAE decode; the table splits it into the
  three stages' medians) and transformer-only, for the teacher (20 DPM-Solver++ steps with CFG 4.5,
  both branches in one batched call) and a one-step student (one DDPM step from T̄ = 400 without CFG:
  how the DMD student samples); per dtype, with torch.compile
  off and on (the transformer and the VAE decoder are compiled), attention through PyTorch SDPA
  (diffusers' AttnProcessor2_0; `--attention eager` for the unfused reference); peak memory per run;
- DMD training at 512 px: the time and peak memory of one `DMD.train_step` (generator update with the
  distribution-matching loss, then a fake-score update) for growing batch sizes, with and without
  gradient checkpointing. Resident: generator and fake score (fp32 weights, AdamW each, bf16 autocast),
  the frozen bf16 teacher and the generator's EMA; T5 is not (training reads cached embeddings).

Writes `benchmark.json` and `benchmark.md` to --out, with the targets beside the figures (scripts/benchmark_report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: benchmark_report.py

from benchmark_report import TARGETS, check_targets, markdown  # noqa: E402,F401  (TARGETS: re-exported)

from evaluation.latency import device_name, device_sync, measure_latency, summarize, time_runs, versions  # noqa: E402
from pixsig_distill.architectures import KNOWN, T5_XXL  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a large red circle in the center on a white background"
GIB = 1024**3


# ---- components -----------------------------------------------------------------------------------

@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype):
    """Create parameters on `device` in `dtype` (no fp32 host copy of a 4.7B encoder)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


SIGMA = {512: "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", 1024: "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}


def sigma_transformer(resolution: int):
    """PixArt-Σ XL/2 at `resolution`, from the published config (pixsig_distill/architectures.py)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**KNOWN[SIGMA[resolution]].transformer)


def t5_xxl_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(decoder_start_token_id=0, **T5_XXL))


def sdxl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**KNOWN[SIGMA[1024]].vae)


def sigma_parts(resolution: int, tokens: int, text_encoder: bool) -> dict:
    """The published PixArt-Σ parts at `resolution` (random weights)."""
    from pixsig_distill.tokenizer import build_t5_tokenizer

    return {"transformer": sigma_transformer(resolution), "vae": sdxl_vae(),
            "text_encoder": t5_xxl_encoder() if text_encoder else None,
            "tokenizer": build_t5_tokenizer(PROMPT.split(), model_max_length=tokens)}


def toy_parts(text_encoder: bool) -> dict:
    """The toy world's parts (pixsig_distill/toy/components.py), random weights."""
    from pixsig_distill.toy import components as toy

    tokenizer = toy.toy_tokenizer()
    return {"transformer": toy.toy_transformer(), "vae": toy.toy_vae(), "tokenizer": tokenizer,
            "text_encoder": toy.toy_text_encoder(len(tokenizer)) if text_encoder else None}


class BenchConfig(NamedTuple):
    resolution: int
    tokens: int                 # text tokens
    build: Callable[[bool], dict]   # text_encoder? → transformer, vae, text_encoder, tokenizer
    gpu_dtypes: tuple = ("bf16", "fp16")   # default dtypes on a GPU (a CPU measures fp32)
    measures_training: bool = False        # DMD training is measured at 512 px (and on the toy)


CONFIGS = {
    "sigma_512": BenchConfig(512, 300, functools.partial(sigma_parts, 512, 300), measures_training=True),
    "sigma_1024": BenchConfig(1024, 300, functools.partial(sigma_parts, 1024, 300)),
    "toy": BenchConfig(32, 16, toy_parts, gpu_dtypes=("fp32",), measures_training=True),
}


def components(config: str, device: torch.device, dtype: torch.dtype, text_encoder: bool = True) -> dict:
    """Random-weight parts of the pipeline of `config`, built on `device` in `dtype`."""
    from pixsig_distill.schedule import PIXART_SCHEDULER
    from diffusers import DPMSolverMultistepScheduler

    with built_on(device, dtype):
        parts = CONFIGS[config].build(text_encoder)
    for module in parts.values():
        if isinstance(module, torch.nn.Module):  # (the tokenizer is not one)
            module.to(device, dtype).eval().requires_grad_(False)
    if not text_encoder:
        parts["tokenizer"] = None
    parts["scheduler"] = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    return parts


def samplers(parts: dict, config: str, device: torch.device):
    """The teacher (20 DPM-Solver++ steps, CFG 4.5) and a one-step student (DDPM from T̄ = 400, no CFG)."""
    from diffusers import DDPMScheduler, PixArtSigmaPipeline

    from pixsig_distill.schedule import scheduler_like
    from pixsig_distill.teacher import Teacher

    resolution, tokens = CONFIGS[config].resolution, CONFIGS[config].tokens
    teacher = Teacher(PixArtSigmaPipeline(**parts), max_sequence_length=tokens, guidance_scale=4.5,
                      num_inference_steps=20, resolution=resolution, device=str(device))
    one_step = scheduler_like(DDPMScheduler, parts["scheduler"].config, clip_sample=False, thresholding=False,
                              variance_type="fixed_small")
    student = Teacher(PixArtSigmaPipeline(**{**parts, "scheduler": one_step}), max_sequence_length=tokens,
                      guidance_scale=1.0, num_inference_steps=1, resolution=resolution, device=str(device))
    return teacher, student


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> dict:
    """Peak memory since the last reset (CUDA caching allocator); None on CPU (not measured)."""
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


# ---- measurements ---------------------------------------------------------------------------------

def latency(config: str, dtype_name: str, compile_modes: list[str], attention: str, device: torch.device,
            warmup: int, runs: int, teacher_steps: int, offload: str = "none") -> list[dict]:
    """Teacher and student, end-to-end and transformer-only, compile off then on (the same InferenceMode the
    generate CLI and the leaderboard use; the VAE decoder is compiled too)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from pixsig_distill.inference import InferenceMode

    parts = components(config, device, DTYPES[dtype_name])
    parts["transformer"].set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    teacher, student = samplers(parts, config, device)
    InferenceMode(offload=offload).apply(teacher)
    InferenceMode(offload=offload).apply(student)
    records = []
    for compiled in compile_modes:
        if compiled == "on":
            InferenceMode(compile=True).apply(teacher)  # the transformer, shared with the student
            parts["vae"].decoder.compile()
        for name, model, kwargs in (("teacher", teacher, {"steps": teacher_steps, "guidance_scale": 4.5}),
                                    ("student_1step", student, {"timesteps": [400], "guidance_scale": 1.0})):
            for mode in ("end_to_end", "transformer"):
                reset_peak(device)
                record = measure_latency(model, PROMPT, mode=mode, warmup=warmup, runs=runs, **kwargs)
                record.pop("versions")
                records.append({**record, "config": config, "model": name, "dtype": dtype_name,
                                "compile": compiled, "attention": attention, "offload": offload, **peak_gib(device)})
                print(f"  {config} {name:13s} {dtype_name} compile={compiled} {mode:10s} "
                      f"median {record['median']:.2f} ms", flush=True)
    del teacher, student, parts
    free(device)
    return records


def dmd_training(config: str, batch_sizes: list[int], checkpointing: list[str], device: torch.device,
                 warmup: int, runs: int) -> list[dict]:
    """Time and peak memory of one DMD step (generator + fake score updates) per batch size."""
    from accelerate import Accelerator
    from diffusers import PixArtSigmaPipeline

    from pixsig_distill.loop import step_generator
    from hydra import compose, initialize_config_module

    from pixsig_distill.config import build
    from pixsig_distill.teacher import Teacher

    mixed = "bf16" if device.type == "cuda" else "no"
    teacher_dtype = torch.bfloat16 if mixed == "bf16" else torch.float32
    resolution, tokens = CONFIGS[config].resolution, CONFIGS[config].tokens
    parts = components(config, device, teacher_dtype, text_encoder=False)  # cached embeddings: T5 not resident
    teacher = Teacher(PixArtSigmaPipeline(**parts), max_sequence_length=tokens, resolution=resolution,
                      device=str(device))
    dim = teacher.transformer.config.caption_channels
    teacher.set_null_embedding(torch.zeros(1, tokens, dim, device=device, dtype=teacher_dtype),
                               torch.ones(1, tokens, dtype=torch.long, device=device))
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)
    records = []
    for ckpt in checkpointing:
        for batch_size in batch_sizes:
            record = {"config": config, "resolution": resolution, "batch_size": batch_size,
                      "gradient_checkpointing": ckpt == "on", "mixed_precision": mixed, "device": device_name(device)}
            method = None
            try:
                reset_peak(device)
                # DMD exactly as `distill=dmd t_bar=400` builds it (conf/distill/dmd.yaml holds the defaults)
                with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
                    cfg = compose("train", overrides=["distill=dmd", "t_bar=400",
                                                      f"train.gradient_checkpointing={ckpt == 'on'}"])
                method = build(cfg.distill, teacher=teacher)
                method.prepare(accelerator)
                batch = {"embeds": torch.randn(batch_size, tokens, dim, device=device, dtype=teacher_dtype),
                         "mask": torch.ones(batch_size, tokens, dtype=torch.long, device=device)}
                counter = iter(range(10**9))

                def step():
                    method.train_step(batch, step_generator(0, next(counter)))

                times = time_runs(step, warmup, runs, device_sync(device))
                stats = summarize(times)
                record.update(status="ok", step_ms=stats, samples_per_s=batch_size / (stats["median"] / 1000),
                              **peak_gib(device))
            except torch.cuda.OutOfMemoryError:
                record.update(status="OOM", **peak_gib(device))
            del method
            accelerator.free_memory()
            free(device)
            records.append(record)
            ms = f"{record['step_ms']['median']:.1f} ms" if record["status"] == "ok" else record["status"]
            print(f"  DMD {config} batch {batch_size} grad-ckpt {ckpt}: {ms}", flush=True)
    del teacher, parts
    free(device)
    return records


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sigma_512,sigma_1024", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--out", required=True, help="folder for benchmark.json and benchmark.md")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    parser.add_argument("--dtypes", default=None, help="comma list of fp16, bf16, fp32 (default: fp16,bf16 on "
                                                       "CUDA; fp32 on CPU and for the toy)")
    parser.add_argument("--compile", default=None, help="off,on (default on CUDA) | off (default on CPU)")
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--teacher-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="DMD training batch sizes (512 px and toy)")
    parser.add_argument("--gradient-checkpointing", default="off,on")
    parser.add_argument("--train-warmup", type=int, default=2)
    parser.add_argument("--train-runs", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma list of latency, training")
    parser.add_argument("--offload", default="none", choices=("none", "model", "sequential"),
                        help="diffusers' CPU offload hooks for the latency runs (GPU only)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    configs = parse_list(args.config)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --config {unknown}; choose from {list(CONFIGS)}")
    skip = set(parse_list(args.skip))
    compile_modes = parse_list(args.compile or ("off,on" if device.type == "cuda" else "off"))
    started = time.time()
    latencies, training = [], []
    for config in configs:
        dtypes = parse_list(args.dtypes) if args.dtypes else (
            ["fp32"] if device.type == "cpu" else list(CONFIGS[config].gpu_dtypes))
        if "latency" not in skip:
            for dtype_name in dtypes:
                latencies += latency(config, dtype_name, compile_modes, args.attention, device, args.warmup,
                                     args.runs, args.teacher_steps, args.offload)
        if "training" not in skip and CONFIGS[config].measures_training:
            training += dmd_training(config, [int(b) for b in parse_list(args.batch_sizes)],
                                     parse_list(args.gradient_checkpointing), device, args.train_warmup,
                                     args.train_runs)
    result = {"meta": {"configs": configs, "device": device_name(device), "versions": versions(),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "warmup": args.warmup, "runs": args.runs,
                       "train_warmup": args.train_warmup, "train_runs": args.train_runs,
                       "teacher_steps": args.teacher_steps, "weights": "random (published configurations)",
                       "seconds": None},
              "latency": latencies, "training": training, "targets": check_targets(latencies, training, device)}
    result["meta"]["seconds"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=1))
    (out / "benchmark.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
