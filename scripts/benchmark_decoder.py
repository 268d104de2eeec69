"""Decode time of one image on this CPU: the SDXL VAE decoder against a tiny decoder, side by side.

    python scripts/benchmark_decoder.py --threads 2 --out docs/results/real_scale/decoder_cpu.json

Both at real width with random weights (time does not depend on the values), float32, under torch.no_grad:
(i) `AutoencoderKL` with the SDXL VAE config (scripts/benchmark.py's `sdxl_vae`: the VAE of PixArt-Σ) and
(ii) `tiny_decoder_like(that vae)` (pixsig_distill/decoders.py: diffusers' `AutoencoderTiny`, the TAESD layout).
Each decodes one image (latents 1×4×R/8×R/8) after a warm-up; the warm-up runs under torch's FLOP counter, so
the time ratio can be set beside the FLOP ratio. Writes the JSON to --out and a markdown table beside it (.md).
A CPU measurement: it says nothing direct about a GPU, where the planner predicts (`plan.vae=tiny`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: benchmark.py's component builders

from benchmark import sdxl_vae  # noqa: E402  (also puts the checkout on sys.path)
from evaluation.latency import summarize, time_runs, versions  # noqa: E402
from pixsig_distill.decoders import tiny_decoder_like  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def measure(name: str, decoder: torch.nn.Module, latents: torch.Tensor, warmup: int, runs: int) -> dict:
    """Warm-up decodes (the first under the FLOP counter), then `runs` timed decodes."""
    from torch.utils.flop_counter import FlopCounterMode

    def decode():
        return decoder.decode(latents).sample

    counter = FlopCounterMode(display=False)
    with counter:
        image = decode()
    times = time_runs(decode, max(warmup - 1, 0), runs)
    stats = {k: v / 1000 for k, v in summarize(times).items() if k != "runs"}  # seconds
    record = {"decoder": name, "class": type(decoder).__name__,
              "parameters": sum(p.numel() for p in decoder.parameters()),
              "decoder_parameters": sum(p.numel() for p in getattr(decoder, "decoder", decoder).parameters()),
              "decode_flops": float(counter.get_total_flops()), "image_shape": list(image.shape),
              "warmup": warmup, "runs": runs, "seconds": stats, "times_s": times, "max_rss_gib_after": max_rss_gib()}
    print(f"  {name}: median {stats['median']:.3f} s over {runs} runs, {record['decode_flops'] / 1e12:.3f} TFLOP",
          flush=True)
    return record


def markdown(result: dict) -> str:
    meta = result["meta"]
    load = meta.get("load_average_1min")
    load = (f"; 1-min load average {load['before']:.1f} before, {load['after']:.1f} after, on {meta['cores']} cores"
            if load else "")
    lines = [f"# Decode of one {meta['resolution']} px image on a CPU (measured)", "",
             f"CPU: {meta['cpu']}; {meta['threads']} threads; torch {meta['versions']['torch']}, diffusers "
             f"{meta['versions']['diffusers']}; float32, torch.no_grad, random weights; latents "
             f"{'×'.join(map(str, meta['latent_shape']))}; median of the timed runs after {meta['warmup']} warm-up; "
             f"{meta['date']}{load}.", "",
             "| decoder | parameters (decoder) | decode GFLOP | median s | min s | max s | timed runs |",
             "|---|---|---|---|---|---|---|"]
    for r in result["decoders"]:
        s = r["seconds"]
        lines.append(f"| {r['decoder']} | {r['decoder_parameters'] / 1e6:.1f} M | {r['decode_flops'] / 1e9:.0f} | "
                     f"{s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {r['runs']} |")
    lines += ["", f"Time ratio VAE / tiny: {result['time_ratio']:.1f}×; FLOP ratio: {result['flop_ratio']:.1f}×."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latents: side / 8)")
    parser.add_argument("--runs", type=int, default=2, help="timed decodes of the SDXL VAE")
    parser.add_argument("--tiny-runs", type=int, default=5, help="timed decodes of the tiny decoder")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON file; the markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    if args.resolution % 8 or args.resolution < 8 or args.runs < 1 or args.tiny_runs < 1 or args.warmup < 1:
        parser.error("--resolution must be a positive multiple of 8; --runs, --tiny-runs and --warmup at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = sdxl_vae().float().eval().requires_grad_(False)
    tiny = tiny_decoder_like(vae).float().eval().requires_grad_(False)
    side = args.resolution // 8
    latents = torch.randn(1, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    began, load_before = time.time(), os.getloadavg()  # other work on the machine shows here: the times share it
    with torch.no_grad():
        records = [measure("tiny decoder (AutoencoderTiny, TAESD layout)", tiny, latents, args.warmup, args.tiny_runs),
                   measure("SDXL VAE decoder (AutoencoderKL)", vae, latents, args.warmup, args.runs)]
    records.reverse()  # the VAE first in the table (the tiny one ran first: the RSS after it is its own)
    vae_r, tiny_r = records
    result = {"measured_on": "cpu",
              "meta": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "resolution": args.resolution,
                       "latent_shape": list(latents.shape), "dtype": "float32", "weights": "random",
                       "warmup": args.warmup, "versions": versions(), "python": platform.python_version(),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.time() - began,
                       "cores": os.cpu_count(), "load_average_1min": {"before": load_before[0],
                                                                      "after": os.getloadavg()[0]}},
              "decoders": records,
              "time_ratio": vae_r["seconds"]["median"] / tiny_r["seconds"]["median"],
              "flop_ratio": vae_r["decode_flops"] / tiny_r["decode_flops"]}
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(text)
    return result


if __name__ == "__main__":
    main()
