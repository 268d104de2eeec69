"""The checks to run when a GPU is lent (about 10 minutes on one H100/H200): one JSON, one markdown file.

1. The planner's predicted peak memory of a DMD step (fake tensors, `python -m pixsig_distill.plan`) next to
   the measured peak of the same step at the real PixArt-Σ 512 size with random weights (bf16 autocast, T5
   not resident), batch 1 and 4, gradient checkpointing off and on.
2. 20 DMD steps under FSDP2 (`fsdp2_full_shard.yaml`, one GPU) on a real-width, 2-layer PixArt-Σ with random
   weights and a cached-embedding stand-in: it runs, checkpoints and exports, and its wall time.
3. The latency benchmark at 512 px (scripts/benchmark.py: teacher-20 and one-step student, bf16, compile off/on).
4. If deepspeed is installed (`pip install -e ".[deepspeed]"`): 10 LCM steps under `deepspeed_zero2.yaml` on one
   GPU, the same real-width model (DeepSpeed has never run with this code; DMD is refused under it).

    python scripts/gpu_check.py --out docs/results/gpu_check

Every figure is written with the GPU's name; predictions are labelled as such.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

REAL = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
GIB = 1024 ** 3


def planner_vs_measured(batch_sizes=(1, 4), checkpointing=("off", "on")) -> list[dict]:
    from hydra import compose, initialize_config_module

    import benchmark
    from pixsig_distill.plan import plan

    measured = benchmark.dmd_training("sigma_512", list(batch_sizes), list(checkpointing), torch.device("cuda"),
                                      warmup=1, runs=3)
    rows = []
    for record in measured:
        overrides = ["model=pixart_sigma_512", "model.load_text_encoder=false", "device=cpu", "eval=none",
                     "train.mixed_precision=bf16", f"train.batch_size={record['batch_size']}",
                     f"train.gradient_checkpointing={str(record['gradient_checkpointing']).lower()}"]
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            cfg = compose("plan", overrides=overrides)
        predicted = plan(cfg)["step"]["peak"]
        rows.append({**record, "predicted_peak_gib": predicted / GIB,
                     "measured_peak_allocated_gib": record.get("peak_allocated_gib")})
    return rows


def fsdp2_run(steps: int = 20, config: str = "fsdp2_full_shard.yaml", method: str = "dmd") -> dict:
    """`accelerate launch` with a shipped config (FSDP2, or DeepSpeed for LCM) on one GPU, a real-width 2-layer
    model."""
    from pixsig_distill.architectures import random_pipeline
    from pixsig_distill.cache_text import cache_text
    from hydra import compose, initialize_config_module

    with tempfile.TemporaryDirectory() as tmp:
        folder, cache, out = Path(tmp) / "sigma512_2layers", Path(tmp) / "cache", Path(tmp) / "run"
        random_pipeline(REAL, num_layers=2).save_pretrained(folder, safe_serialization=True)
        model = ["model=pixart_sigma_512", f"model.pretrained={folder}", "model.max_sequence_length=300"]
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            cache_text(compose("cache_text", overrides=[*model, "prompts=toy_train", f"out_dir={cache}"]))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "pixsig_distill/conf/accelerate" / config), "--num_processes", "1",
                   "-m", "pixsig_distill.train", *model, "model.load_text_encoder=false", "data=cached",
                   f"data.folder={cache}", f"distill={method}", "t_bar=400", "train.mixed_precision=bf16",
                   "train.gradient_checkpointing=true", f"train.max_steps={steps}", "train.batch_size=2",
                   "train.log_every=5", f"train.ckpt_every={steps // 2}", "eval=none", f"out_dir={out}"]
        began = time.time()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
        summary = json.loads((out / "train_summary.json").read_text()) if (out / "train_summary.json").is_file() else {}
        return {"returncode": done.returncode, "wall_s": time.time() - began, "steps": summary.get("step"),
                "last_logs": summary.get("last_logs"), "export": (out / "export" / "pixsig_student.json").is_file(),
                "optimizer_states_saved": any((out / "checkpoints").glob("*/optimizer-*.safetensors")),
                "log_tail": (done.stdout + done.stderr)[-2000:] if done.returncode else ""}


def markdown(result: dict) -> str:
    lines = [f"# GPU check on {result['gpu']}", "", f"torch {torch.__version__}, {result['date']}", "",
             "## Planner (prediction) vs measured peak memory, DMD step, PixArt-Σ 512, random weights", "",
             "| batch | grad. ckpt | predicted peak (GiB) | measured peak allocated (GiB) | status |", "|---|---|---|---|---|"]
    for row in result["planner_vs_measured"]:
        measured = row.get("measured_peak_allocated_gib")
        lines.append(f"| {row['batch_size']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
                     f"{row['predicted_peak_gib']:.1f} | {'—' if measured is None else f'{measured:.1f}'} | "
                     f"{row['status']} |")
    run = result["fsdp2"]
    lines += ["", "## 20 DMD steps under FSDP2 (1 GPU, real width, 2 layers, bf16, checkpointing)", "",
              f"exit code {run['returncode']}, {run['wall_s']:.0f} s, steps {run['steps']}, export written: "
              f"{run['export']}, optimizer states in the checkpoints: {run['optimizer_states_saved']}", "",
              "## Latency", "", f"See `{result['benchmark']}/benchmark.md`."]
    if "deepspeed_zero2_lcm" in result:
        ds = result["deepspeed_zero2_lcm"]
        lines += ["", "## 10 LCM steps under DeepSpeed ZeRO-2 (1 GPU)", "",
                  f"exit code {ds['returncode']}, {ds['wall_s']:.0f} s, steps {ds['steps']}, export written: {ds['export']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; this script is for a machine with a GPU "
                         "(on CPU use scripts/validate_plan.py and scripts/benchmark.py --config toy)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import benchmark

    result = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "prediction_note":
              "predicted_peak_gib comes from the planner (fake tensors), not from a measurement"}
    result["planner_vs_measured"] = planner_vs_measured()
    result["fsdp2"] = fsdp2_run()
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        result["deepspeed_zero2_lcm"] = fsdp2_run(10, "deepspeed_zero2.yaml", "lcm")
    benchmark.main(["--config", "sigma_512", "--skip", "training", "--runs", "10", "--out", str(out / "benchmark")])
    result["benchmark"] = str(out / "benchmark")
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
