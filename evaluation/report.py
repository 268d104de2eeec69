"""Leaderboard files: markdown, CSV, JSON, the comparison grid and the T̄ sweep plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pixsig_distill.model_card import _fmt, cell  # noqa: F401  (one format for figures in cards and boards)


# The PixArt-Σ paper's supplement, Table 1: DMD and LCM against their teacher at 512 px.
PAPER_LABEL = "PixArt-Σ paper, 512 px, COCO-style prompts — not comparable in absolute terms"
PAPER_TABLE = [
    {"method": "LCM 1 step", "fid": 108.66, "clip": 0.2247, "time_s": 0.11},
    {"method": "LCM 2 steps", "fid": 17.95, "clip": 0.2736, "time_s": 0.16},
    {"method": "LCM 4 steps", "fid": 13.06, "clip": 0.2797, "time_s": 0.26},
    {"method": "DMD 1 step", "fid": 13.35, "clip": 0.2788, "time_s": 0.11},
    {"method": "teacher 20 steps", "fid": 9.273, "clip": 0.2863, "time_s": 1.44},
]

BASE_COLUMNS = ["name", "group", "method", "steps", "timesteps", "guidance_scale", "vae"]
STAGES = ("text_encoder", "transformer", "vae")  # the end-to-end breakdown (evaluation/latency.py)
TAIL_COLUMNS = ["latency_median_ms", "latency_p90_ms", "transformer_median_ms", "transformer_p90_ms",
                *(f"{stage}_stage_median_ms" for stage in STAGES), "n_samples", "path"]


def _label(row: dict) -> str:
    return row["name"] if row.get("kind") == "real" else f"{row['name']} ({row['steps']})"


NOT_INDEPENDENT = "†"


def mark(row: dict, column: dict) -> str:
    """` †` on a figure computed with a model the row's training objective also read (evaluate.shared_models)."""
    return f" {NOT_INDEPENDENT}" if column["key"] in (row.get("not_independent") or {}) else ""


def independence_note(rows: list[dict]) -> list[str]:
    """What the † marks mean, naming each marked row's shared models."""
    marked = {_label(r): sorted({m for models in r["not_independent"].values() for m in models})
              for r in rows if r.get("not_independent")}
    if not marked:
        return []
    return ["", f"{NOT_INDEPENDENT} **not independent**: the figure is computed with a model that the row's training "
            "objective also read (" + "; ".join(f"{label}: {', '.join(models)}" for label, models in marked.items())
            + "), so it is no evidence about that row."]


def overlapping_pairs(rows: list[dict], column: dict) -> list[tuple[str, str]]:
    """Pairs of rows whose intervals of `column` overlap: differences the data do not resolve."""
    key = column["key"]
    have = [r for r in rows if r.get(f"{key}_lo") is not None and r.get(f"{key}_hi") is not None]
    return [(_label(a), _label(b)) for i, a in enumerate(have) for b in have[i + 1:]
            if a[f"{key}_lo"] <= b[f"{key}_hi"] and b[f"{key}_lo"] <= a[f"{key}_hi"]]


def breakdown(row: dict) -> str:
    """`2.9 + 9.3 + 4.7`: the medians of T5, the transformer steps and the VAE decode in the end-to-end runs."""
    stages = row.get("latency_stages_ms") or {}
    return " + ".join(_fmt(stages.get(stage), 1) for stage in STAGES) if stages else "—"


def write_markdown(path: Path, rows: list[dict], meta: dict) -> None:
    columns, lat = meta["columns"], meta.get("latency")
    boot = meta.get("bootstrap") or {}
    lines = ["# Leaderboard", "",
             f"Prompts: {meta['prompts']} ({meta['n_samples']} images per row, image i from seed "
             f"{meta['seed']} + i, the same for every row). Device: {meta['device']}. {meta['date']}.",
             "", f"Brackets: {100 * boot.get('confidence', 0.95):.0f} % intervals, {boot.get('method', 'bootstrap')} "
             f"({boot.get('resamples')} resamples)" + (f"; ± the standard deviation over {meta['seed_sets']} seed "
                                                       f"sets of the generated images" if meta.get("seed_sets", 1) > 1
                                                       else "") + ".", "",
             "| name | method | steps | timesteps | " + " | ".join(c["header"] + (" ↑" if c["better"] == "higher" else " ↓")
                                                        for c in columns)
             + " | latency median (ms) | p90 (ms) | T5 + transformer + VAE (ms) | transformer-only median (ms) | n |",
             "|" + "---|" * (len(columns) + 9)]
    for r in rows:
        e2e, tr = r.get("latency_ms") or {}, r.get("latency_transformer_ms") or {}
        cells = " | ".join(cell(r, c) + mark(r, c) for c in columns)
        steps = "" if r.get("kind") == "real" else r["steps"]
        timesteps = ", ".join(str(t) for t in r.get("timesteps") or [])
        lines.append(f"| {r['name']} | {r['method']} | {steps} | {timesteps} | {cells} | "
                     f"{_fmt(e2e.get('median'), 1)} | {_fmt(e2e.get('p90'), 1)} | {breakdown(r)} | "
                     f"{_fmt(tr.get('median'), 1)} | {r['n_samples']} |")
    lines += independence_note(rows)
    lines += paired_section(rows, meta)
    lines += seeds_section(rows, meta)
    lines += ["", "## What the columns are", ""]
    for name, settings in meta.get("scorers", {}).items():
        details = "; ".join(f"{k}: {v}" for k, v in settings.items() if v is not None and k != "resamples")
        lines.append(f"- **{name}**: {details}.")
    if lat:
        lines.append(f"- **Latency**: batch {lat['batch_size']}, {lat['warmup']} warm-up + {lat['runs']} timed runs, "
                     f"device synchronised, median and p90 (numpy, linear); end-to-end = T5 + transformer steps + "
                     f"VAE decode, each stage timed in the same runs between device synchronisations (medians); "
                     f"transformer-only = the denoising loop on precomputed embeddings, timed apart; "
                     f"{lat.get('dtype')}, {lat.get('resolution')} px"
                     + (f"; inference mode: {lat['inference']}" if lat.get("inference") else "") + ".")
    lines += ["", "## Differences the intervals do not resolve", "",
              "Pairs of rows whose intervals overlap (a difference between them may be noise):", ""]
    for column in columns:
        pairs = overlapping_pairs(rows, column)
        if column.get("interval", True):
            lines.append(f"- **{column['header']}**: " + ("; ".join(f"{a} ≈ {b}" for a, b in pairs) or "none") + ".")
    lines += ["", f"## For reference: {PAPER_LABEL}", "",
              "| method | FID ↓ | CLIP ↑ (plain cosine) | time ↓ |", "|---|---|---|---|"]
    lines += [f"| {p['method']} | {p['fid']} | {p['clip']} | {p['time_s']} s |" for p in PAPER_TABLE]
    lines += ["", f"Grid (`{'grid.png' if path.stem == 'leaderboard' else path.stem + '_grid.png'}`): the same "
              f"{meta.get('grid_n', 8)} prompts and seeds in every row; rows, top to bottom: "
              f"{', '.join(meta.get('grid_rows', []))}."]
    if (path.parent / "tbar_sweep.png").is_file():
        lines += ["", "The first two columns of the one-step rows against their start timestep T̄: `tbar_sweep.png`."]
    path.write_text("\n".join(lines) + "\n")


def paired_cell(row: dict, column: dict) -> str:
    """`+0.012 [0.004, 0.020] better`: row − reference on the same prompts and seeds, its paired interval, and
    the verdict."""
    key, digits = column["key"], column["digits"]
    if row.get(f"{key}_diff") is None:
        return "—"
    return (f"{row[f'{key}_diff']:+.{digits}f} [{_fmt(row[f'{key}_diff_lo'], digits)}, "
            f"{_fmt(row[f'{key}_diff_hi'], digits)}] {row[f'{key}_verdict']}")


def paired_section(rows: list[dict], meta: dict) -> list[str]:
    """The paired comparison of every row with its reference row (the teacher; a tiny-decoder row: the same model
    with its own VAE), a table per reference, when the evaluation made one."""
    compared = [r for r in rows if r.get("compared_to")]
    if not compared:
        return []
    columns = [c for c in meta["columns"] if any(r.get(f"{c['key']}_diff") is not None for r in compared)]
    boot = meta.get("bootstrap") or {}
    lines = []
    for reference in dict.fromkeys(r["compared_to"] for r in compared):
        lines += ["", f"## Against {reference}, image for image", "",
                  f"Each row minus the reference on the same prompts and seeds, with a "
                  f"{100 * boot.get('confidence', 0.95):.0f} % paired bootstrap interval ({boot.get('resamples')} "
                  f"resamples of the same image indices in both rows; FID and CMMD recomputed on each resample). "
                  f"**better** / **worse**: the interval excludes 0 on that side (the arrow says which side is "
                  f"good); **not resolved**: it does not.", "",
                  "| row | " + " | ".join(f"Δ {c['header']} {'↑' if c['better'] == 'higher' else '↓'}" for c in columns)
                  + " |", "|" + "---|" * (len(columns) + 1)]
        lines += [f"| {_label(r)} | " + " | ".join(paired_cell(r, c) + mark(r, c) for c in columns) + " |"
                  for r in compared if r["compared_to"] == reference]
    return lines


def seed_groups(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Rows of one recipe trained with several seeds (entries with the same `group`), per step count."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r.get("group"):
            groups.setdefault((r["group"], r["steps"]), []).append(r)
    return {key: members for key, members in groups.items() if len(members) > 1}


def _mean_sd(values: list[float], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    sd = np.std(values, ddof=1) if len(values) > 1 else float("nan")
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}"


def seeds_section(rows: list[dict], meta: dict) -> list[str]:
    """Mean ± sd over training seeds beside the typical resampling interval, and the paired verdicts per seed:
    retraining moves a figure more than resampling the images does ("The FID Lottery")."""
    groups = seed_groups(rows)
    if not groups:
        return []
    columns = meta["columns"]
    lines = ["", "## Across training seeds", "",
             "Each recipe trained with several seeds (`group` in the board): mean ± sd over the seeds; in brackets the "
             "mean resampling interval of one seed's figure, for scale; then the difference from the reference, mean ± "
             "sd, with each seed's paired verdict.", "",
             "| recipe (steps) | seeds | " + " | ".join(c["header"] for c in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for (group, steps), members in groups.items():
        cells = []
        for c in columns:
            key, digits = c["key"], c["digits"]
            text = _mean_sd([m.get(key) for m in members], digits)
            if all(m.get(f"{key}_lo") is not None for m in members):
                text += (f" [{np.mean([m[f'{key}_lo'] for m in members]):.{digits}f}, "
                         f"{np.mean([m[f'{key}_hi'] for m in members]):.{digits}f}]")
            if all(m.get(f"{key}_diff") is not None for m in members):
                verdicts = ", ".join(m[f"{key}_verdict"] for m in members)
                text += f"; Δ {_mean_sd([m[f'{key}_diff'] for m in members], digits)} ({verdicts})"
            cells.append(text + (mark(members[0], c) if any(mark(m, c) for m in members) else ""))
        lines.append(f"| {group} ({steps}) | {len(members)} | " + " | ".join(cells) + " |")
    return lines


def csv_columns(meta: dict, rows: list[dict] = ()) -> list[str]:
    keys = []
    for column in meta["columns"]:
        keys += [column["key"]] + ([f"{column['key']}_lo", f"{column['key']}_hi"] if column["interval"] else [])
        if meta.get("seed_sets", 1) > 1:
            keys.append(f"{column['key']}_seed_std")
    if meta.get("compare_to") or any(r.get("compared_to") for r in rows):  # the teacher, or a row's own reference
        keys += ["compared_to"] + [f"{c['key']}_{part}" for c in meta["columns"]
                                   for part in ("diff", "diff_lo", "diff_hi", "verdict")]
    return BASE_COLUMNS + keys + TAIL_COLUMNS


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, csv_columns(meta, rows), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            e2e, tr = r.get("latency_ms") or {}, r.get("latency_transformer_ms") or {}
            stages = {f"{stage}_stage_median_ms": ms for stage, ms in (r.get("latency_stages_ms") or {}).items()}
            writer.writerow({**r, "latency_median_ms": e2e.get("median"), "latency_p90_ms": e2e.get("p90"),
                             "transformer_median_ms": tr.get("median"), "transformer_p90_ms": tr.get("p90"), **stages})


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


def start_timestep(row: dict) -> int | None:
    """T̄ of a one-step row that samples at one fixed timestep (its card's), else None."""
    timesteps = row.get("timesteps") or []
    return timesteps[0] if row["steps"] == 1 and len(timesteps) == 1 else None


def write_tbar_sweep(path: Path, rows: list[dict], columns: list[dict]) -> bool:
    """The board's first two columns against T̄ for the one-step rows that start at a fixed timestep (the PixArt-Σ
    paper's supplement, Fig. 1), if there are two T̄ or more."""
    dmd = sorted((r for r in rows if start_timestep(r) is not None), key=start_timestep)
    if len({start_timestep(r) for r in dmd}) < 2 or len(columns) < 2:
        path.unlink(missing_ok=True)  # a plot from an earlier run with other entries would mislead
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = next((r for r in rows if r.get("kind") == "teacher" and r["steps"] == 20), None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, column in zip(axes, columns[:2]):
        key, label = column["key"], f"{column['header']} {'↑' if column['better'] == 'higher' else '↓'}"
        have = [r for r in dmd if r.get(key) is not None]
        if have:
            x, y = [start_timestep(r) for r in have], np.array([r[key] for r in have])
            lo = np.array([r.get(f"{key}_lo", r[key]) for r in have])
            hi = np.array([r.get(f"{key}_hi", r[key]) for r in have])
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", capsize=3, label="1 step (95 % interval)")
        if teacher is not None and teacher.get(key) is not None:
            ax.axhline(teacher[key], ls="--", color="gray", label="teacher, 20 steps")
        ax.set_xlabel("T̄ (start timestep)")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def portable(value):
    """Paths inside the installed package written relative to it (`pixsig_distill/toy/weights/clip`), so that a
    committed board names no machine's folders."""
    import pixsig_distill

    root = str(Path(pixsig_distill.__file__).resolve().parent.parent) + "/"
    if isinstance(value, str):
        return value.replace(root, "")
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    return value


def write_all(out: Path, stem: str, results: list[dict], meta: dict, images: list, grid_n: int) -> None:
    """<stem>.md / .csv / .json, the grid (one row per result) and tbar_sweep.png."""
    meta.update(portable(meta))
    n_grid = min(grid_n, meta["n_samples"])
    meta.update(grid_n=n_grid, grid_rows=[r["name"] if r.get("kind") == "real" else f"{r['name']} ({r['steps']} "
                                          f"step{'' if r['steps'] == 1 else 's'})" for r in results])
    write_grid(out / ("grid.png" if stem == "leaderboard" else f"{stem}_grid.png"),
               [np.stack([np.asarray(rows[i]) for i in range(n_grid)]) for rows in images])
    write_tbar_sweep(out / "tbar_sweep.png", results, meta["columns"])
    write_json(out / f"{stem}.json", results, meta)
    write_csv(out / f"{stem}.csv", results, meta)
    write_markdown(out / f"{stem}.md", results, meta)
