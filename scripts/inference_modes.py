"""Measure the inference modes (pixsig_distill/inference.py) on this machine; write docs/results/inference/.

1. Latency, compile off and on, of the toy teacher (20 steps, CFG) and a toy one-step DMD student: end-to-end
   (T5 + transformer + VAE), batch 1, median of timed runs after warm-up; the first call, which compiles,
   is timed apart.
2. Peak resident memory (VmHWM) of `python -m pixsig_distill.generate` with and without
   `text_encoder.release=true` on a real-width PixArt-Σ 512 (2 transformer layers, the real VAE) whose T5 is a
   stand-in at the real width (d_model 4096, d_ff 10240, 64 heads) with `--t5-layers` layers: each run in a
   fresh process, the same 8 prompts, one DMD-like step.
3. The planner's PREDICTION of peak GPU memory per mode at 512 and 1024 px (`plan.inference=true`).

    python scripts/inference_modes.py --student outputs/train/dmd_toy/t_bar=400/export [--t5-layers 3]

Run it alone on the machine: timings are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2 ** 30
PROMPT = "a large red circle in the center on a white background"


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        return hydra_compose(name, overrides=overrides)


def latency(student: str, runs: int, warmup: int) -> list[dict]:
    import torch

    from evaluation.latency import measure_latency
    from pixsig_distill.inference import InferenceMode, load_for_inference

    rows = []
    for name, path, kwargs in (("teacher, 20 steps, CFG 4.5", None, {}), ("DMD student, 1 step", student, {})):
        for compiled in (False, True):
            torch._dynamo.reset()
            cfg = compose("generate", ["prompt=x", f"compile={str(compiled).lower()}"])
            mode = InferenceMode.from_config(cfg)
            model, spec = load_for_inference(cfg.model, path, "cpu", mode)
            args = {"steps": spec.num_inference_steps, "guidance_scale": spec.guidance_scale,
                    "timesteps": spec.timesteps}
            began = time.perf_counter()
            measure_latency(model, PROMPT, warmup=0, runs=1, **args)  # the first call: compiles when compile=true
            first = time.perf_counter() - began
            record = measure_latency(model, PROMPT, warmup=warmup, runs=runs, **args)
            rows.append({"model": name, "compile": compiled, "first_call_s": first, "median_ms": record["median"],
                         "p90_ms": record["p90"], "runs": runs, "mode": mode.describe(model)})
            print(f"  {name:28s} compile={compiled!s:5s} first call {first:6.2f} s, median {record['median']:.1f} ms",
                  flush=True)
    return rows


def stand_in_model(folder: Path, t5_layers: int) -> int:
    """Real-width Σ-512 (2 layers, real VAE) with a real-width T5 stand-in; returns the T5's parameter count."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from pixsig_distill.architectures import KNOWN, random_pipeline

    pipe = random_pipeline("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", num_layers=2)
    config = {**KNOWN["PixArt-alpha/PixArt-Sigma-XL-2-512-MS"].text_encoder, "num_layers": t5_layers,
              "vocab_size": len(pipe.tokenizer), "decoder_start_token_id": 0}
    torch.manual_seed(0)
    pipe.text_encoder = T5EncoderModel(T5Config(**config))
    pipe.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in pipe.text_encoder.parameters())


def peak_rss(folder: Path, prompts: Path, release: bool, out: Path) -> dict:
    command = [sys.executable, "-c",
               "import atexit, resource, runpy, sys; sys.argv = sys.argv[1:]; "
               "atexit.register(lambda: print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); "
               "runpy.run_module('pixsig_distill.generate', run_name='__main__')",
               "generate", f"hydra.run.dir={out}", "model=pixart_sigma_512", f"model.pretrained={folder}", "model.torch_dtype=float32",
               "device=cpu", f"prompts={prompts}", "n_images=1", "steps=1", "guidance_scale=1", "batch_size=8",
               f"text_encoder.release={str(release).lower()}", f"out_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    peak = [line for line in done.stdout.splitlines() if line.startswith("PEAK_KB")]
    if done.returncode or not peak:
        raise RuntimeError(done.stderr[-3000:])
    return {"text_encoder.release": release, "peak_rss_gib": int(peak[0].split()[1]) * 1024 / GIB}


def predictions() -> dict:
    from pixsig_distill.plan import generation_memory, inference_memory

    out = {}
    for model in ("pixart_sigma_512", "pixart_sigma_1024"):
        cfg = compose("plan", [f"model={model}", "model.load_text_encoder=false", "device=cpu", "eval=none"])
        out[model] = {name: value / GIB for name, value in inference_memory(generation_memory(cfg, True)).items()}
    return out


def markdown(result: dict) -> str:
    lines = [f"# Inference modes, measured on {result['machine']}", "",
             f"torch {result['torch']}, {result['threads']} threads, {result['date']}.", "",
             "## Latency, compile off / on (CPU, inductor), batch 1, end-to-end", "",
             "| model | compile | first call (s) | median (ms) | p90 (ms) |", "|---|---|---|---|---|"]
    for row in result["latency"]:
        lines.append(f"| {row['model']} | {'on' if row['compile'] else 'off'} | {row['first_call_s']:.1f} | "
                     f"{row['median_ms']:.1f} | {row['p90_ms']:.1f} |")
    memory = result["memory"]
    lines += ["", f"## Peak resident memory, real-width Σ-512 (2 layers) with a {memory['t5_parameters'] / 1e9:.2f} B "
              f"parameter T5 stand-in (float32, real width, {memory['t5_layers']} layers), 8 prompts", "",
              "| text_encoder.release | peak RSS (GiB) |", "|---|---|"]
    lines += [f"| {row['text_encoder.release']} | {row['peak_rss_gib']:.2f} |" for row in memory["runs"]]
    lines += ["", "## PREDICTED peak GPU memory per mode (planner, fake tensors; bf16, batch 1, CFG; not measured)", "",
              "| mode | Σ 512 (GiB) | Σ 1024 (GiB) |", "|---|---|---|"]
    for name in result["predicted"]["pixart_sigma_512"]:
        lines.append(f"| {name} | {result['predicted']['pixart_sigma_512'][name]:.2f} | "
                     f"{result['predicted']['pixart_sigma_1024'][name]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="a toy one-step student export (DMD)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "inference"))
    parser.add_argument("--t5-layers", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    result = {"machine": f"{cpu}, {os.cpu_count()} cores (CPU only)",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    result["latency"] = latency(args.student, args.runs, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        folder, prompts = Path(tmp) / "sigma512_wide_t5", Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(f"a {c} circle at the top on a white background"
                                     for c in ("red", "blue", "green", "yellow", "purple", "orange", "pink", "gray")))
        parameters = stand_in_model(folder, args.t5_layers)
        runs = [peak_rss(folder, prompts, release, Path(tmp) / f"gen{release}") for release in (False, True)]
        result["memory"] = {"t5_layers": args.t5_layers, "t5_parameters": parameters, "runs": runs}
        print(f"  peak RSS: {runs}", flush=True)
    result["predicted"] = predictions()
    (out / "inference_modes.json").write_text(json.dumps(result, indent=1))
    (out / "inference_modes.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
