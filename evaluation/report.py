"""Leaderboard files: markdown, CSV, JSON, the comparison grid and the T̄ sweep plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


# PixArt-Σ supplement, Table 1 (the seed result; /work/shared/reference/algorithms.md).
PAPER_LABEL = "PixArt-Σ paper, 512 px, COCO-style prompts — not comparable in absolute terms"
PAPER_TABLE = [
    {"method": "LCM 1 step", "fid": 108.66, "clip": 0.2247, "time_s": 0.11},
    {"method": "LCM 2 steps", "fid": 17.95, "clip": 0.2736, "time_s": 0.16},
    {"method": "LCM 4 steps", "fid": 13.06, "clip": 0.2797, "time_s": 0.26},
    {"method": "DMD 1 step", "fid": 13.35, "clip": 0.2788, "time_s": 0.11},
    {"method": "teacher 20 steps", "fid": 9.273, "clip": 0.2863, "time_s": 1.44},
]

CSV_COLUMNS = ["name", "method", "steps", "t_bar", "guidance_scale", "fid", "clip", "clip_100", "latency_median_ms",
               "latency_p90_ms", "transformer_median_ms", "transformer_p90_ms", "n_samples", "path"]


def _fmt(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def write_markdown(path: Path, rows: list[dict], meta: dict, grid_rows: list[str]) -> None:
    fid, clip, lat = meta.get("fid"), meta.get("clip"), meta.get("latency")
    lines = ["# Leaderboard", "",
             f"Prompts: {meta['prompts']} ({meta['n_samples']} images per row, image i from seed "
             f"{meta['seed']} + i, the same for every row). Device: {meta['device']}. {meta['date']}.", "",
             "| name | method | steps | T̄ | FID ↓ | CLIP ↑ | latency median (ms) | p90 (ms) "
             "| transformer-only median (ms) | n |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e2e, tr = r.get("latency_ms") or {}, r.get("latency_transformer_ms") or {}
        lines.append(f"| {r['name']} | {r['method']} | {r['steps']} | {r.get('t_bar') or ''} | {_fmt(r['fid'], 2)} | "
                     f"{_fmt(r['clip'], 4)} | {_fmt(e2e.get('median'), 1)} | {_fmt(e2e.get('p90'), 1)} | "
                     f"{_fmt(tr.get('median'), 1)} | {r['n_samples']} |")
    lines += [""]
    if fid:
        lines.append(f"- **FID**: {fid['library']} ({fid['mode']}), features: {fid['features_description']}; "
                     f"resize: {fid['resize']}; {fid['n_real']} real images vs {meta['n_samples']} generated per row.")
    if clip:
        extra = f" `clip_100` in the CSV/JSON is {clip['scale_100']}." if "scale_100" in clip else ""
        lines.append(f"- **CLIP**: {clip['description']}, {clip['scale']}: mean cosine(image, its prompt).{extra}")
    if lat:
        lines.append(f"- **Latency**: batch {lat['batch_size']}, {lat['warmup']} warm-up + {lat['runs']} timed runs, "
                     f"device synchronised, median and p90 (numpy, linear); end-to-end = T5 + transformer steps + "
                     f"VAE decode, transformer-only = the denoising loop on precomputed embeddings; "
                     f"{lat.get('dtype')}, "
                     f"{lat.get('resolution')} px.")
    lines += ["", f"## For reference: {PAPER_LABEL}", "",
              "| method | FID ↓ | CLIP ↑ (plain cosine) | time ↓ |", "|---|---|---|---|"]
    lines += [f"| {p['method']} | {p['fid']} | {p['clip']} | {p['time_s']} s |" for p in PAPER_TABLE]
    lines += ["", f"Grid (`grid.png`): the same {meta.get('grid_n', 8)} prompts and seeds in every row; rows, top to "
              f"bottom: {', '.join(grid_rows)}."]
    if (path.parent / "tbar_sweep.png").is_file():
        lines += ["", "FID and CLIP of the DMD rows against T̄: `tbar_sweep.png`."]
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            e2e, tr = r.get("latency_ms") or {}, r.get("latency_transformer_ms") or {}
            writer.writerow({**{k: r.get(k) for k in CSV_COLUMNS}, "latency_median_ms": e2e.get("median"),
                             "latency_p90_ms": e2e.get("p90"), "transformer_median_ms": tr.get("median"),
                             "transformer_p90_ms": tr.get("p90")})


def write_json(path: Path, rows: list[dict], meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1, default=str))
    tmp.replace(path)


def write_grid(path: Path, row_images: list[np.ndarray]) -> None:
    """One row per entry; rows of another resolution are resized to the first (nearest) to fit."""
    from PIL import Image

    from pixsig_distill.images import save_grid

    h, w = row_images[0].shape[1:3]
    fitted = [r if r.shape[1:3] == (h, w) else
              np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.NEAREST)) for im in r]) for r in row_images]
    save_grid(np.concatenate(fitted), path, columns=len(row_images[0]), scale=max(1, 128 // h))


def write_tbar_sweep(path: Path, rows: list[dict]) -> bool:
    """FID and CLIP against T̄ for the DMD rows (the seed's Fig. 1), if there are two T̄ or more."""
    dmd = sorted((r for r in rows if r["method"] == "dmd" and r.get("t_bar") is not None), key=lambda r: r["t_bar"])
    if len({r["t_bar"] for r in dmd}) < 2:
        path.unlink(missing_ok=True)  # a plot from an earlier run with other entries would mislead
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = next((r for r in rows if r["method"] == "teacher" and r["steps"] == 20), None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "fid", "FID ↓"), (axes[1], "clip", "CLIP score ↑ (plain cosine)")):
        points = [(r["t_bar"], r[key]) for r in dmd if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", label="DMD, 1 step")
        if teacher is not None and teacher.get(key) is not None:
            ax.axhline(teacher[key], ls="--", color="gray", label="teacher, 20 steps")
        ax.set_xlabel("T̄ (DMD start timestep)")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
