"""`python -m evaluation.leaderboard`: every student against the teacher, on one prompt set, same seeds.

Rows: the teacher at `teacher_steps` (20, and 4 and 1 for contrast), then each of `entries`
(`{name, method, path, steps}`: DMD exports at 1 step, LCM / LCM-LoRA exports at 1, 2, 4 steps).
For each row: images (cached per prompt and seed under out_dir/cache, so a stopped run resumes),
latency (end-to-end and transformer-only), then FID against the real set and CLIP score. Writes
leaderboard.md / .csv / .json, grid.png and, with several DMD T̄, tbar_sweep.png.
"""

from __future__ import annotations

import datetime
import gc
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

import pixsig_distill.config  # noqa: F401  (registers the ${toy_asset:...} resolver the model configs use)
from pixsig_distill.config import build, check_int, one_line_config_errors
from pixsig_distill.errors import UserError, exit_on_user_error

from . import report
from .cache import ImageCache, entry_key, generate_cached, weights_fingerprint
from pixsig_distill.threads import configure_threads

METHODS = ("teacher", "dmd", "lcm", "lcm_lora")


@dataclass
class RowSpec:
    name: str
    method: str
    steps: int
    path: str | None = None  # None: the configured teacher
    guidance_scale: float | None = None  # None: the model's own
    card: dict = field(default_factory=dict)

    @property
    def t_bar(self) -> int | None:
        return self.card.get("t_bar")


def _steps_list(value, where: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    if not values:
        raise UserError(f"{where}: steps is empty; give a positive integer or a list such as [1, 2, 4]")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UserError(f"{where}: steps={v!r} is not a positive integer; use e.g. steps=1 (DMD) or "
                            f"[1, 2, 4] (LCM)")
    return values


def parse_rows(cfg: DictConfig) -> list[RowSpec]:
    """Teacher rows, then entry rows, checked before anything is loaded."""
    from pixsig_distill.students import read_card

    rows = [RowSpec("teacher", "teacher", s) for s in _steps_list(cfg.teacher_steps, "teacher_steps")] \
        if cfg.teacher_steps else []
    entries = OmegaConf.to_container(cfg.entries, resolve=True) if cfg.entries else []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise UserError(f"entry {number} is {entry!r}; each entry is {{name, method, path, steps}}")
        method = str(entry.get("method", "")).lower()
        name = str(entry.get("name") or f"{method}_{number}")
        where = f"entry '{name}'"
        if method not in METHODS:
            raise UserError(f"{where}: unknown method '{entry.get('method')}'; use one of {', '.join(METHODS)}")
        path = entry.get("path")
        if path is None and method != "teacher":
            raise UserError(f"{where}: no path; give the export/ folder of a {method} training run")
        card = {}
        if path is not None:
            path = str(Path(str(path)).expanduser())
            if not Path(path).exists():
                raise UserError(f"{where}: path '{path}' does not exist; give the export/ folder of a training run")
            if method != "teacher":
                card = read_card(path)
                if card.get("method") != method:
                    raise UserError(f"{where}: method={method} but '{path}' holds a {card.get('method')} student")
        default = card.get("num_inference_steps", 20)
        for steps in _steps_list(entry.get("steps", default), where):
            if method == "dmd" and steps != 1:
                raise UserError(f"{where}: steps={steps}; a DMD student samples in one step from T̄, use steps=1")
            if card.get("original_inference_steps") and steps > card["original_inference_steps"]:
                raise UserError(f"{where}: steps={steps} exceeds the {card['original_inference_steps']}-step grid "
                                f"this student was trained on")
            rows.append(RowSpec(name, method, steps, path, entry.get("guidance_scale"), card))
    seen = set()
    for row in rows:
        if (row.name, row.steps) in seen:
            raise UserError(f"two rows are named '{row.name}' at {row.steps} steps; give entries distinct names")
        seen.add((row.name, row.steps))
    if not rows:
        raise UserError("nothing to evaluate: teacher_steps is empty and no entries are given")
    return rows


def validate(cfg: DictConfig) -> None:
    if cfg.n_samples is not None:
        check_int(cfg, "n_samples", 2, hint="use at least 2 images per row (FID needs 2; 1000+ for real figures)")
    for key, low in (("seed", 0), ("batch_size", 1), ("grid.n", 1), ("latency.warmup", 0), ("latency.runs", 1),
                     ("latency.batch_size", 1), ("fid.batch_size", 1), ("clip.batch_size", 1)):
        check_int(cfg, key, low)
    from .fid import FEATURES, LIBRARIES

    if cfg.fid.library not in LIBRARIES:
        raise UserError(f"unknown FID library '{cfg.fid.library}'; use one of {', '.join(LIBRARIES)}")
    if cfg.fid.features not in FEATURES:
        raise UserError(f"unknown FID features '{cfg.fid.features}'; use one of {', '.join(FEATURES)}")
    bad = set(cfg.latency.modes) - {"end_to_end", "transformer"}
    if bad:
        raise UserError(f"latency.modes has {sorted(bad)}; use end_to_end and/or transformer")


class Models:
    """Loads each model once; keeps the teacher and at most one student in memory."""

    def __init__(self, cfg: DictConfig, device: str):
        self.cfg, self.device, self.loaded = cfg, device, {}

    def get(self, row: RowSpec):
        key = (row.method == "teacher", row.path)
        if key not in self.loaded:
            for other in [k for k in self.loaded if not k[0]]:  # drop the previous student
                del self.loaded[other]
            gc.collect()
            self.loaded[key] = self._load(row)
        return self.loaded[key]

    def _load(self, row: RowSpec):
        from pixsig_distill.students import load_student

        if row.method == "teacher":
            overrides = {"device": self.device, **({"torch_dtype": self.cfg.dtype} if self.cfg.dtype else {})}
            if row.path is not None:
                overrides["pretrained"] = row.path
            return build(self.cfg.model, **overrides)
        model_cfg = OmegaConf.to_container(self.cfg.model, resolve=True)
        return load_student(row.path, model_cfg, device=self.device, dtype=self.cfg.dtype)[0]


def _row_settings(row: RowSpec, cfg: DictConfig, device: str) -> dict:
    """Everything that shapes a row's images: its cache key is a hash of this."""
    teacher = row.path if row.method == "teacher" and row.path else str(cfg.model.pretrained)
    return {"method": row.method, "steps": row.steps, "guidance_scale": _sampler_args(row, cfg)["guidance_scale"],
            "timesteps": row.card.get("timesteps"), "path": str(Path(row.path).resolve()) if row.path else None,
            "weights": weights_fingerprint(row.path or teacher), "teacher": teacher,
            "teacher_weights": weights_fingerprint(teacher), "dtype": cfg.dtype or cfg.model.get("torch_dtype"),
            "resolution": cfg.model.get("resolution"), "max_sequence_length": cfg.model.get("max_sequence_length"),
            "device_type": device.split(":")[0]}


def _steps_label(steps: int) -> str:
    return f"{steps} step" + ("" if steps == 1 else "s")


def _sampler_args(row: RowSpec, cfg: DictConfig) -> dict:
    # A card's timesteps pin DMD's single step at T̄; LCM and the teacher take a step count.
    timesteps = row.card.get("timesteps") if row.method == "dmd" else None
    own = cfg.model.get("guidance_scale") if row.method == "teacher" else row.card.get("guidance_scale")
    guidance = row.guidance_scale if row.guidance_scale is not None else own
    return {"steps": row.steps, "guidance_scale": guidance, "timesteps": timesteps}


def generate_and_time(cfg: DictConfig, rows: list[RowSpec], prompts: list[str], seeds: list[int], out: Path,
                      accelerator, device: str) -> tuple[list[ImageCache], list[dict]]:
    """Each row's images (what the cache lacks, sharded over processes) and, on the main process, its latency."""
    from .latency import measure_latency

    models = Models(cfg, device)
    caches, latencies = [], []
    for row in rows:  # rows of one model are adjacent, so each model loads once
        settings = _row_settings(row, cfg, device)
        cache = ImageCache(out / "cache" / entry_key(row.name, row.steps, settings), settings,
                           accelerator.process_index)
        args = _sampler_args(row, cfg)
        generate_cached(lambda row=row: models.get(row), cache, prompts, seeds, args["steps"], args["guidance_scale"],
                        args["timesteps"], cfg.batch_size, accelerator,
                        desc=f"generating {row.name} ({_steps_label(row.steps)})")
        lat = {}
        if cfg.latency.enabled and accelerator.is_main_process:
            for mode in cfg.latency.modes:
                lat[mode] = measure_latency(models.get(row), prompts[0], mode=mode, batch_size=cfg.latency.batch_size,
                                            warmup=cfg.latency.warmup, runs=cfg.latency.runs, **args)
        caches.append(cache)
        latencies.append(lat)
    models.loaded.clear()
    gc.collect()
    return caches, latencies


def load_scorers(cfg: DictConfig, out: Path, device: str):
    """FID and CLIP networks, loaded before any generation so that missing weights fail in seconds, not hours."""
    fid = clip = None
    if cfg.fid.enabled:
        from .fid import FID

        fid = FID(cfg.fid.library, cfg.fid.features, device, cfg.fid.batch_size, out / "cache" / "fid_stats",
                  progress=cfg.progress)
        fid.load()
    if cfg.clip.enabled:
        from .clip_score import CLIPScorer

        clip = CLIPScorer(cfg.clip.model, cfg.clip.pretrained, device, cfg.clip.batch_size, cfg.clip.also_100,
                          progress=cfg.progress)
    return fid, clip


def score_rows(cfg: DictConfig, rows: list[RowSpec], caches: list[ImageCache], latencies: list[dict],
               prompts: list[str], real, fid, clip) -> tuple[list[dict], dict | None, dict | None]:
    """The leaderboard rows (FID, CLIP, latency), and the FID and CLIP settings that label them."""
    fid_meta = clip_meta = None
    results = []
    for row, cache, lat in zip(rows, caches, latencies):
        images, label = cache.files(len(prompts)), f"{row.name} ({_steps_label(row.steps)})"
        result = {"name": row.name, "method": row.method, "steps": row.steps, "t_bar": row.t_bar,
                  "guidance_scale": _sampler_args(row, cfg)["guidance_scale"], "path": row.path,
                  "fid": None, "clip": None, "clip_100": None, "n_samples": len(prompts), "cache": cache.folder.name}
        if fid is not None:
            scored = fid.score(real, images, desc=f"FID features {label}")
            result["fid"] = scored.pop("fid")
            fid_meta = scored
        if clip is not None:
            scored = clip.score(images, prompts, desc=f"CLIP {label}")
            result["clip"], result["clip_100"] = scored.pop("clip"), scored.pop("clip_100", None)
            clip_meta = scored
        for mode, key in (("end_to_end", "latency_ms"), ("transformer", "latency_transformer_ms")):
            result[key] = {"median": lat[mode]["median"], "p90": lat[mode]["p90"]} if mode in lat else None
        result["latency"] = {mode: {k: v for k, v in rec.items() if k != "versions"} for mode, rec in lat.items()}
        results.append(result)
    return results, fid_meta, clip_meta


def run(cfg: DictConfig) -> dict:
    """Evaluate every row and write the leaderboard files; returns {"rows", "meta"} (empty off the main process)."""
    from accelerate import Accelerator

    from .latency import device_name, versions
    from .prompts import image_folder, load_prompt_set

    validate(cfg)
    rows = parse_rows(cfg)
    prompt_set = load_prompt_set(str(cfg.prompts), cfg.n_samples)
    real = None
    if cfg.fid.enabled:
        real = image_folder(cfg.fid.real) if cfg.fid.real else prompt_set.real
        if real is None:
            raise UserError(f"prompt set '{prompt_set.source}' has no real images; set fid.real=FOLDER of reference "
                            f"images (e.g. COCO val2014) or fid.enabled=false")
    accelerator = Accelerator()
    device = str(accelerator.device) if cfg.device == "auto" else str(cfg.device)
    prompts, out = prompt_set.prompts, Path(cfg.out_dir)
    seeds = [cfg.seed + i for i in range(len(prompts))]

    fid, clip = load_scorers(cfg, out, device) if accelerator.is_main_process else (None, None)
    caches, latencies = generate_and_time(cfg, rows, prompts, seeds, out, accelerator, device)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    results, fid_meta, clip_meta = score_rows(cfg, rows, caches, latencies, prompts, real, fid, clip)

    timed = next((rec for lat in latencies for rec in lat.values()), {})
    n_grid = min(cfg.grid.n, len(prompts))
    meta = {"prompts": prompt_set.source, "n_samples": len(prompts), "seed": cfg.seed,
            "teacher": str(cfg.model.pretrained),
            "fid": fid_meta and {**fid_meta, "real": str(cfg.fid.real or prompt_set.source)}, "clip": clip_meta,
            "latency": {**OmegaConf.to_container(cfg.latency), "percentiles": "numpy.percentile, linear",
                        **{k: timed.get(k) for k in ("dtype", "resolution", "device")}}
            if cfg.latency.enabled else None,
            "device": timed.get("device") or device_name(device), "versions": versions(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "paper_table_1": {"label": report.PAPER_LABEL, "rows": report.PAPER_TABLE},
            "grid_n": n_grid, "grid_rows": [f"{r['name']} ({_steps_label(r['steps'])})" for r in results]}
    report.write_grid(out / "grid.png", [np.stack([c.files(n_grid)[i] for i in range(n_grid)]) for c in caches])
    report.write_tbar_sweep(out / "tbar_sweep.png", results)
    report.write_json(out / "leaderboard.json", results, meta)
    report.write_csv(out / "leaderboard.csv", results)
    report.write_markdown(out / "leaderboard.md", results, meta, meta["grid_rows"])
    print((out / "leaderboard.md").read_text().split("\n## ")[0])
    print(f"leaderboard written to {out}")
    return {"rows": results, "meta": meta}


@one_line_config_errors("leaderboard")
@hydra.main(version_base="1.3", config_path="pkg://pixsig_distill.conf", config_name="leaderboard")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    configure_threads()
    run(cfg)


if __name__ == "__main__":
    main()
