"""The targets and the markdown report of scripts/benchmark.py (kept apart to keep that script short)."""

from __future__ import annotations

import torch

from evaluation.latency import device_name

TARGETS = {
    "student_e2e_ms": 40.0,       # 1-step end-to-end at 512 px on an H100
    "teacher_student_ratio": 13.0,  # teacher (20 steps, CFG) / student (1 step), end-to-end
    "train_memory_gib": 80.0,     # DMD training at 512 px fits an 80 GB GPU ...
    "train_batch": 4,             # ... at batch >= 4
}
STAGES = ("text_encoder", "transformer", "vae")  # measure_latency's end-to-end stages: T5, the steps, the decode


def check_targets(latencies: list[dict], training: list[dict], device: torch.device) -> list[dict]:
    """The targets beside the figures; a target is only judged on the hardware and size it names."""
    on_h100 = device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)
    where = "" if on_h100 else f" (measured on {device_name(device)}, not an H100: not judged)"
    e2e = {(r["dtype"], r["compile"], r["model"]): r["median"] for r in latencies
           if r["config"] == "sigma_512" and r["mode"] == "end_to_end"}
    students = {k[:2]: v for k, v in e2e.items() if k[2] == "student_1step"}
    out = []
    if students:
        best = min(students, key=students.get)
        ms, ratio = students[best], e2e.get((*best, "teacher"), float("nan")) / students[best]
        out.append({"target": f"1-step end-to-end at 512 px <= {TARGETS['student_e2e_ms']:.0f} ms on an H100",
                    "measured": f"{ms:.1f} ms ({best[0]}, compile {best[1]})" + where,
                    "met": (ms <= TARGETS["student_e2e_ms"]) if on_h100 else None})
        out.append({"target": f"teacher-20 / student-1 end-to-end >= {TARGETS['teacher_student_ratio']:.0f}",
                    "measured": f"{ratio:.1f}x ({best[0]}, compile {best[1]})" + where,
                    "met": (ratio >= TARGETS["teacher_student_ratio"]) if on_h100 else None})
    fits = [r for r in training if r["config"] == "sigma_512" and r["status"] == "ok"
            and r["peak_reserved_gib"] is not None and r["peak_reserved_gib"] <= TARGETS["train_memory_gib"]]
    if any(r["config"] == "sigma_512" for r in training):
        largest = max((r["batch_size"] for r in fits), default=0)
        judged = device.type == "cuda"
        out.append({"target": f"DMD training at 512 px fits in {TARGETS['train_memory_gib']:.0f} GB at batch "
                              f">= {TARGETS['train_batch']}",
                    "measured": f"largest batch within {TARGETS['train_memory_gib']:.0f} GiB reserved: {largest}",
                    "met": (largest >= TARGETS["train_batch"]) if judged else None})
    if not out:
        out.append({"target": "all targets are for the real PixArt-Σ 512 on an H100",
                    "measured": "not judged: run without --config toy on a GPU", "met": None})
    return out


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# PixArt-Σ benchmark ({', '.join(meta['configs'])})", "",
             f"Device: {meta['device']}; torch {meta['versions']['torch']}, diffusers {meta['versions']['diffusers']}; "
             f"random weights; {meta['runs']} timed runs after {meta['warmup']} warm-up runs; "
             f"{meta['date']}.", ""]
    if result["latency"]:
        lines += ["## Latency (batch 1)", "",
                  "End to end = T5 + transformer + VAE: each stage's median over the same runs, timed between two "
                  "device synchronisations (medians of parts need not add up exactly to the median of the sum).", "",
                  "| config | model | dtype | compile | attention | mode | median ms | p90 ms | T5 ms | "
                  "transformer ms | VAE ms | peak alloc GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["latency"]:
            stages = [fmt((r.get("stages") or {}).get(name, {}).get("median")) for name in STAGES]
            lines.append(f"| {r['config']} | {r['model']} | {r['dtype']} | {r['compile']} | {r['attention']} | "
                         f"{r['mode']} | {r['median']:.2f} | {r['p90']:.2f} | {' | '.join(stages)} | "
                         f"{fmt(r['peak_allocated_gib'])} |")
        lines.append("")
    if result["training"]:
        lines += ["## DMD training step", "",
                  "| config | batch | grad ckpt | precision | step median ms | samples/s | peak alloc GiB | "
                  "peak reserved GiB | status |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["training"]:
            ok = r["status"] == "ok"
            lines.append(f"| {r['config']} | {r['batch_size']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                         f"{r['mixed_precision']} | {fmt(r['step_ms']['median'] if ok else None, 1)} | "
                         f"{fmt(r['samples_per_s'] if ok else None)} | {fmt(r['peak_allocated_gib'])} | "
                         f"{fmt(r['peak_reserved_gib'])} | {r['status']} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in result["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def write_report(out: str | None, result: dict, text: str) -> None:
    """Print the markdown; with `out`, also write <out>.json (the figures) and <out>.md (the table)."""
    import json
    from pathlib import Path

    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(text)
