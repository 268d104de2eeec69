"""What trimmed text encoding saves at PixArt-Σ's real width: T5-XXL and the transformer's cross-attention over
a prompt's own tokens instead of 300 padded ones. Random weights, reduced depth, on this machine.

    python scripts/trim_gain.py --t5-layers 2 --transformer-layers 1 --out docs/results/real_scale/trim_gain

T5-XXL at its real width (d_model 4096, 64 heads, d_ff 10240) with `--t5-layers` of its 24 layers, and the
PixArt-Σ 1024 transformer (1152 wide, 4,096 image tokens) with `--transformer-layers` of its 28, each timed at
batch 1 over 300 tokens and over each of `--tokens`, side by side in one process (median of `--runs` after a
warm-up). Full-depth figures are the per-layer time × depth plus the rest: an extrapolation, labelled as such.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixsig_distill.architectures import KNOWN, T5_XXL  # noqa: E402
from benchmark_report import write_report  # noqa: E402

SIGMA_1024 = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1000 * sorted(times)[len(times) // 2]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@torch.no_grad()
def measure(token_counts: list[int], t5_layers: int, transformer_layers: int, runs: int) -> dict:
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(decoder_start_token_id=0, **{**T5_XXL, "num_layers": t5_layers})).eval()
    config = {**KNOWN[SIGMA_1024].transformer, "num_layers": transformer_layers}
    transformer = PixArtTransformer2DModel(**config).eval()
    latents = torch.randn(1, 4, 128, 128)
    rows = []
    for tokens in [300, *token_counts]:
        ids = torch.randint(0, 32000, (1, tokens))
        mask = torch.ones(1, tokens, dtype=torch.long)
        text = torch.randn(1, tokens, 4096)
        rows.append({"tokens": tokens,
                     "t5_ms": median_ms(lambda: t5(input_ids=ids, attention_mask=mask), runs),
                     "transformer_ms": median_ms(lambda: transformer(
                         latents, encoder_hidden_states=text, encoder_attention_mask=mask,
                         timestep=torch.tensor([400]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
                         max(1, runs // 2))})
    for row in rows:
        row["t5_ratio"] = row["t5_ms"] / rows[0]["t5_ms"]
        row["transformer_ratio"] = row["transformer_ms"] / rows[0]["transformer_ms"]
        # full depth, extrapolated: T5's cost is all in its layers; the transformer's layers dominate its call
        row["t5_24_layers_ms_extrapolated"] = row["t5_ms"] * 24 / t5_layers
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
            "t5_layers": t5_layers, "transformer_layers": transformer_layers, "runs": runs, "rows": rows,
            "note": "random weights, reduced depth; a CPU measurement; 24-layer T5 figures are extrapolated"}


def markdown(result: dict) -> str:
    lines = [f"Trimmed text encoding at real width ({result['cpu']}, {result['threads']} threads, torch "
             f"{result['torch']}, float32, random weights): T5-XXL with {result['t5_layers']} of 24 layers and the "
             f"PixArt-Σ 1024 transformer with {result['transformer_layers']} of 28, batch 1, median of "
             f"{result['runs']} runs. A CPU measurement; the 24-layer column is an extrapolation (× 24 / layers).",
             "", "| T5 tokens | T5 (ms) | vs 300 | T5 24 layers (ms, extrapolated) | transformer call (ms) | vs 300 |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['tokens']} | {r['t5_ms']:.0f} | {r['t5_ratio']:.2f} | {r['t5_24_layers_ms_extrapolated']:.0f}"
                     f" | {r['transformer_ms']:.0f} | {r['transformer_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="16,32,64,120", help="trimmed token counts to compare with 300")
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--transformer-layers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure([int(t) for t in args.tokens.split(",")], args.t5_layers, args.transformer_layers, args.runs)
    write_report(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
