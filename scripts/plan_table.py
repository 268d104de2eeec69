"""The planning table of docs/real_scale.md: predicted peak memory of PixArt-Σ 512 / 1024 runs (fake tensors).

    python scripts/plan_table.py [--out docs/results/real_scale/plan_table.json] [--only dmd2]

Every row is `python -m pixsig_distill.plan` for one configuration: bf16 teacher and mixed precision, T5
embeddings from the cache (model.load_text_encoder=false, as experiment=pixart_sigma_512_dmd), one fake-score
update per step. All figures are PREDICTIONS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "dmd: full G + full fake": [],
    "dmd: full G + LoRA fake": ["distill.fake_score.lora_rank=64"],
    "dmd: LoRA G + LoRA fake": ["distill.fake_score.lora_rank=64", "distill.generator.lora_rank=64"],
    "dmd: full G + LoRA fake, 8-bit AdamW, EMA on CPU": [
        "distill.fake_score.lora_rank=64", "distill.ema_device=cpu",
        "distill.generator_optimizer._target_=pixsig_distill.optim.adamw_8bit",
        "distill.fake_optimizer._target_=pixsig_distill.optim.adamw_8bit"],
    "dmd2: full G + full fake, GAN head": ["distill=dmd2", "distill.fake_updates_per_step=1"],
    "dmd2: full G + LoRA fake, GAN head": ["distill=dmd2", "distill.fake_updates_per_step=1",
                                           "distill.fake_score.lora_rank=64"],
    "lcm (full)": ["distill=lcm"],
    "lcm_lora (r 32)": ["distill=lcm_lora"],
}
MODELS = {"Σ-512": "pixart_sigma_512", "Σ-1024": "pixart_sigma_1024"}
BATCHES = (1, 2, 4, 8)
GPUS = ("4090", "l40s", "h100")  # 24 / 48 / 80 GB


def markdown(table: dict) -> str:
    """Peak GiB per (model, variant, checkpointing) row and batch column; * = fits a 24 GB GPU, † = 48 GB,
    ‡ = 80 GB (within 90 % of the memory), none = needs more."""
    rows = {}
    for r in table["rows"]:
        key = (r["model"], r["variant"], "on" if r["checkpointing"] else "off")
        mark = "*" if r["fits_4090"] else "†" if r["fits_l40s"] else "‡" if r["fits_h100"] else ""
        rows.setdefault(key, {})[r["batch"]] = f"{r['peak'] / 2**30:.1f}{mark}"
    lines = ["| model | networks and options | checkpointing | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
             "|---|---|---|" + "---|" * len(BATCHES)]
    for (model, variant, ckpt), cells in rows.items():
        lines.append(f"| {model} | {variant} | {ckpt} | " + " | ".join(cells.get(b, "") for b in BATCHES) + " |")
    return "\n".join(lines)


def latency_table() -> str:
    """Roofline generation latency (PREDICTIONS): T5 + transformer calls + VAE decode, batch 1, bf16."""
    from hydra import compose, initialize_config_module

    from pixsig_distill.plan import GPUS as KNOWN_GPUS, generation_flops, roofline_latency

    lines = ["| model | GPU | 1 step (DMD) | 4 steps (LCM) | 20 steps × CFG (teacher) | T5 share of 1 step |",
             "|---|---|---|---|---|---|"]
    for model_name, model in MODELS.items():
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            cfg = compose("plan", overrides=[f"model={model}", "eval=none"])
        parts = generation_flops(cfg)
        for gpu in ("h100", "a100", "l40s", "4090"):
            g = KNOWN_GPUS[gpu]
            one, four, teacher = (roofline_latency(parts, g, n, calls) for n, calls in ((1, 1), (4, 1), (20, 2)))
            t5 = roofline_latency({**parts, "transformer": {"flops": 0, "weight_bytes": 0},
                                   "vae": {"flops": 0, "weight_bytes": 0}}, g, 1, 1)
            lines.append(f"| {model_name} | {g.name} | {1000 * one:.0f} ms | {1000 * four:.0f} ms | "
                         f"{1000 * teacher:.0f} ms | {t5 / one:.0%} |")
    flops = ", ".join(f"{k} {v['flops'] / 1e12:.2f} TFLOP / {v['weight_bytes'] / 2**30:.1f} GiB of weights"
                      for k, v in parts.items())
    return "\n".join(lines) + f"\n\nPer call at {list(MODELS)[-1]}: {flops}.\n"


def main() -> None:
    from hydra import compose, initialize_config_module

    from pixsig_distill.fake_step import predict_step
    from pixsig_distill.plan import GPUS as KNOWN_GPUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/real_scale/plan_table.json")
    parser.add_argument("--markdown-only", action="store_true", help="re-render the .md from the existing .json")
    parser.add_argument("--latency", action="store_true", help="write the generation-latency table instead")
    parser.add_argument("--only", help="plan only the variants whose name contains this text; the other rows of "
                                        "--out are kept")
    args = parser.parse_args()
    if args.latency:
        Path(args.out).with_name("plan_latency.md").write_text(latency_table())
        print(Path(args.out).with_name("plan_latency.md").read_text())
        return
    if args.markdown_only:
        Path(args.out).with_suffix(".md").write_text(markdown(json.loads(Path(args.out).read_text())) + "\n")
        return
    rows, began = [], time.time()
    variants = {name: o for name, o in VARIANTS.items() if args.only is None or args.only in name}
    for model_name, model in MODELS.items():
        for variant, overrides in variants.items():
            for checkpointing in (False, True):
                for batch in BATCHES:
                    extra = [] if any(o.startswith("distill=") for o in overrides) else [
                        "distill.fake_updates_per_step=1"]
                    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
                        cfg = compose("plan", overrides=[
                            f"model={model}", "model.load_text_encoder=false", "eval=none",
                            "train.mixed_precision=bf16", f"train.batch_size={batch}",
                            f"train.gradient_checkpointing={str(checkpointing).lower()}", *overrides, *extra])
                    step, _ = predict_step(cfg)
                    row = {"model": model_name, "variant": variant, "checkpointing": checkpointing, "batch": batch,
                           "overrides": overrides, **step.__dict__,
                           **{f"fits_{g}": KNOWN_GPUS[g].fits(step.peak) for g in GPUS}}
                    rows.append(row)
                    print(f"{model_name} | {variant} | ckpt {checkpointing} | b{batch}: {step.peak / 2**30:.1f} GiB",
                          flush=True)
    if args.only is not None:  # the rows of the other variants, as last planned
        rows += [r for r in json.loads(Path(args.out).read_text())["rows"] if r["variant"] not in variants]
        rows.sort(key=lambda r: (list(MODELS).index(r["model"]), list(VARIANTS).index(r["variant"]),
                                 r["checkpointing"], r["batch"]))
    table = {"prediction": True, "minutes": (time.time() - began) / 60,
             "gpus": {g: KNOWN_GPUS[g].__dict__ for g in GPUS}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table, indent=1))
    Path(args.out).with_suffix(".md").write_text(markdown(table) + "\n")
    print(f"wrote {args.out} and its .md")


if __name__ == "__main__":
    main()
