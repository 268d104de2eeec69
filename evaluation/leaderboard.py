"""`python -m evaluation.leaderboard`: every student against the teacher, on one prompt set, same seeds.

Rows: the real images (a fresh draw, where the prompt set can make one: the ceiling every metric can
reach), the teacher at `teacher_steps` (20, and 4 and 1 for contrast), then each of `entries`
(`{name, path, steps}`; `steps` defaults to the card's `eval_steps`: 1 for DMD, [1, 2, 4] for LCM; `vae:` a tiny
decoder for that row, `compare_to:` the row its paired differences are taken against, e.g. the same student
with its VAE).
The metrics, prompt set and bootstrap come from the eval preset (`eval=toy`, `eval=coco2014_30k`,
`eval=mjhq30k`; conf/eval/) through `evaluation.evaluate`, the engine the end-of-training evaluation
runs too. Writes leaderboard.md / .csv / .json, grid.png and, with several DMD T̄, tbar_sweep.png.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import pixsig_distill.config  # noqa: F401  (registers the ${toy_asset:...} resolver the model configs use)
from pixsig_distill.config import check_int
from pixsig_distill.errors import UserError
from pixsig_distill.inference import InferenceMode
from pixsig_distill.console import entry_point

from . import report
from .evaluate import (Evaluation, RowSpec, build_prompt_set, build_scorers, check_row_steps, evaluate,
                       reference_row)
from .scorer import ScoringContext


def _steps_list(value, where: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    if not values:
        raise UserError(f"{where}: steps is empty; give a positive integer or a list such as [1, 2, 4]")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UserError(f"{where}: steps={v!r} is not a positive integer; use e.g. steps=1 (DMD) or "
                            f"[1, 2, 4] (LCM)")
    return values


def parse_rows(cfg: DictConfig, real_row: bool = False) -> list[RowSpec]:
    """The real row, teacher rows, then entry rows, checked before anything is loaded."""
    from pixsig_distill.students import read_card

    rows = [RowSpec("real images (another draw)", "real", 0)] if real_row else []
    rows += [RowSpec("teacher", "teacher", s) for s in _steps_list(cfg.teacher_steps, "teacher_steps")] \
        if cfg.teacher_steps else []
    entries = OmegaConf.to_container(cfg.entries, resolve=True) if cfg.entries else []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise UserError(f"entry {number} is {entry!r}; each entry is {{name, path, steps}}")
        name = str(entry.get("name") or entry.get("method") or f"entry_{number}")
        where = f"entry '{name}'"
        path, kind, card = entry.get("path"), "teacher" if entry.get("method") == "teacher" else "student", {}
        if path is None and kind == "student":
            raise UserError(f"{where}: no path; give the export/ folder of a training run (or method: teacher)")
        if path is not None:
            path = str(Path(str(path)).expanduser())
            if not Path(path).exists():
                raise UserError(f"{where}: path '{path}' does not exist; give the export/ folder of a training run")
            if kind == "student":
                card = read_card(path)
                if entry.get("method") and card.get("method") != entry["method"]:
                    raise UserError(f"{where}: method={entry['method']} but '{path}' holds a {card.get('method')} "
                                    f"student")
        vae = entry.get("vae")
        if vae is not None:
            vae = str(Path(str(vae)).expanduser())
            if not Path(vae).is_dir():
                raise UserError(f"{where}: vae '{vae}' does not exist; give the export/ folder of a "
                                f"distill=tiny_decoder run")
        default = card.get("eval_steps") or card.get("num_inference_steps", 20)
        for steps in _steps_list(entry.get("steps", default), where):
            row = RowSpec(name, kind, steps, path, entry.get("guidance_scale"), card, entry.get("group"), vae,
                          entry.get("compare_to"))
            check_row_steps(row)
            rows.append(row)
    seen = set()
    for row in rows:
        if (row.name, row.steps) in seen:
            raise UserError(f"two rows are named '{row.name}' at {row.steps} steps; give entries distinct names")
        seen.add((row.name, row.steps))
    for row in rows:
        if row.compare_to is not None and (row.compare_to, row.steps) not in seen:
            raise UserError(f"entry '{row.name}': compare_to={row.compare_to!r} names no row at {row.steps} steps; "
                            f"name an entry (or teacher) evaluated at the same steps")
    if not [r for r in rows if r.kind != "real"]:
        raise UserError("nothing to evaluate: teacher_steps is empty and no entries are given")
    return rows


def validate(cfg: DictConfig) -> None:
    if cfg.n_samples is not None:
        check_int(cfg, "n_samples", 2, hint="use at least 2 images per row (FID needs 2; 1000+ for real figures)")
    for key, low in (("seed", 0), ("batch_size", 1), ("grid.n", 1), ("latency.warmup", 0), ("latency.runs", 1),
                     ("latency.batch_size", 1), ("eval.seed_sets", 1), ("eval.bootstrap.resamples", 0)):
        check_int(cfg, key, low)
    bad = set(cfg.latency.modes) - {"end_to_end", "transformer"}
    if bad:
        raise UserError(f"latency.modes has {sorted(bad)}; use end_to_end and/or transformer")


def run(cfg: DictConfig) -> dict:
    """Evaluate every row and write the leaderboard files; returns {"rows", "meta"} (empty off the main process)."""
    from accelerate import Accelerator

    from .latency import device_name, versions

    validate(cfg)
    rows = parse_rows(cfg, real_row=cfg.eval.real_row)
    prompt_set = build_prompt_set(cfg.eval, cfg.n_samples, cfg.prompts, cfg.real)
    accelerator = Accelerator()
    device = str(accelerator.device) if cfg.device == "auto" else str(cfg.device)
    out = Path(cfg.out_dir)
    boot = cfg.eval.bootstrap
    context = ScoringContext(prompt_set, device, str(out / "cache"), cfg.progress, boot.resamples, boot.confidence,
                             boot.seed)
    scorers = build_scorers(cfg.eval, context)
    latency = OmegaConf.to_container(cfg.latency) if cfg.latency.enabled else None
    ev = Evaluation(cfg.model, prompt_set, scorers, out, accelerator, device, cfg.seed, cfg.eval.seed_sets,
                    cfg.batch_size, InferenceMode.from_config(cfg), latency=latency, progress=cfg.progress,
                    compare_to=reference_row(cfg.eval))
    results, images = evaluate(ev, rows)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    timed = next((rec for r in results for rec in r["latency"].values()), {})
    meta = {**ev.meta(str(cfg.model.pretrained)),
            "latency": {**OmegaConf.to_container(cfg.latency), "percentiles": "numpy.percentile, linear",
                        **{k: timed.get(k) for k in ("dtype", "resolution", "device", "inference")}}
            if cfg.latency.enabled else None,
            "device": timed.get("device") or device_name(device), "versions": versions(),
            "paper_table_1": {"label": report.PAPER_LABEL, "rows": report.PAPER_TABLE}}
    report.write_all(out, "leaderboard", results, meta, images, cfg.grid.n)
    print((out / "leaderboard.md").read_text().split("\n## ")[0])
    print(f"leaderboard written to {out}")
    return {"rows": results, "meta": meta}


main = entry_point("leaderboard", run, validate=validate)


if __name__ == "__main__":
    main()
