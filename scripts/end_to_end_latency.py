"""One-step end-to-end latency, before and after the two end-to-end levers, measured side by side in one process.

    python scripts/end_to_end_latency.py --student outputs/train/dmd_toy/t_bar=400/export \
        --vae outputs/train/tiny_decoder_toy/dmd_tbar400/export --out docs/results/toy_tiny_decoder/latency

The same student on the same prompt (batch 1), run the ways that matter: the model's VAE with prompts padded to
`max_sequence_length` (before) and trimmed to the prompt (inference `text_encoder.trim`), then each tiny decoder
(`--vae`, one or more; inference `vae=`) with padded and with trimmed prompts. Each is timed by
`evaluation.latency.measure_latency` (warm-up, then timed runs, each stage between device synchronisations); the
variants take turns over `--rounds` rounds so that drift of the machine falls on all of them, and each figure is the
median of the rounds' medians. Prints a table with the T5 / transformer / VAE breakdown and the
ratio to the first row, and writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation.latency import device_name, measure_latency, versions  # noqa: E402
from benchmark_report import write_report  # noqa: E402

PROMPT = "a large red circle in the center on a white background"
STAGES = ("text_encoder", "transformer", "vae")


def measure(student: str, vaes: list[str], model: str, rounds: int, runs: int, device: str) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import pixsig_distill.config  # noqa: F401  (the ${toy_asset:...} resolver)
    from pixsig_distill.decoders import with_decoder
    from pixsig_distill.students import load_student

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        model_cfg = OmegaConf.to_container(compose("train", overrides=[f"model={model}"]).model, resolve=True)
    full, spec = load_student(student, model_cfg, device=device)
    variants = {"VAE, padded prompts": (full, False), "VAE, trimmed prompts": (full, True)}
    for vae in vaes:  # the same networks, a tiny decoder
        tiny, label = with_decoder(full, vae), Path(vae).parent.name if Path(vae).name == "export" else Path(vae).name
        variants.update({f"tiny decoder {label}, padded prompts": (tiny, False),
                         f"tiny decoder {label}, trimmed prompts": (tiny, True)})
    times = {name: {"total": [], **{s: [] for s in STAGES}} for name in variants}
    sampler = {"steps": spec.num_inference_steps, "guidance_scale": spec.guidance_scale, "timesteps": spec.timesteps}
    for _ in range(rounds):
        for name, (model_, trim) in variants.items():
            model_.trim_text = trim
            record = measure_latency(model_, PROMPT, warmup=2, runs=runs, **sampler)
            times[name]["total"].append(record["median"])
            for stage in STAGES:
                times[name][stage].append(record["stages"][stage]["median"])
    import numpy as np

    rows = [{"variant": name, **{k: float(np.median(v)) for k, v in figures.items()}} for name, figures in times.items()]
    for row in rows:
        row["ratio"] = row["total"] / rows[0]["total"]
    tokens = {"padded": full.max_sequence_length, "trimmed": full.prompt_tokens([PROMPT])}
    return {"student": student, "vae": vaes, "model": model, "prompt": PROMPT, "tokens": tokens, "rounds": rounds,
            "runs_per_round": runs, "batch_size": 1, "device": device_name(full.device), "rows": rows,
            "versions": versions(), "statistic": "median over rounds of each round's median (ms)"}


def markdown(result: dict) -> str:
    lines = [f"One-step end-to-end latency of `{result['student']}`, batch 1, {result['device']}: "
             f"{result['rounds']} rounds × {result['runs_per_round']} timed runs per variant, taking turns; "
             f"T5 tokens: {result['tokens']['padded']} padded, {result['tokens']['trimmed']} trimmed. A CPU "
             f"measurement.", "",
             "| variant | end to end (ms) | T5 (ms) | transformer (ms) | decoder (ms) | ratio |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['total']:.1f} | {r['text_encoder']:.1f} | {r['transformer']:.1f} | "
                     f"{r['vae']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="a student export folder")
    parser.add_argument("--vae", required=True, nargs="+", help="tiny decoder export folders (distill=tiny_decoder)")
    parser.add_argument("--model", default="toy", help="the model config the student belongs to")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    result = measure(args.student, args.vae, args.model, args.rounds, args.runs, args.device)
    write_report(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
