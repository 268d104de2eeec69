"""The one evaluation engine: the leaderboard and the end-of-training evaluation both run `evaluate`.

A row is a sampler (the teacher at some steps, or an exported student at some steps, its recipe
read from the export's card) or the ceiling row of real images. For each row the engine makes the
images the scorers need (cached per prompt and seed, sharded over processes), optionally times
the sampler, then asks every scorer of the eval preset for its figures. Nothing here knows a
method or a metric by name.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from pixsig_distill.config import build
from pixsig_distill.decoders import decoder_folder
from pixsig_distill.errors import UserError
from pixsig_distill.inference import InferenceMode, add_prompts, load_for_inference
from pixsig_distill.model_card import DECODER_CARD

from .cache import ImageCache, entry_key, generate_cached, weights_fingerprint
from .prompts import PromptSet, load_prompt_set
from .scorer import Scorer, ScorerSet, ScoringContext, paired_difference

log = logging.getLogger(__name__)
SEED_SET_STRIDE = 1_000_000  # seed set k starts at seed + k * stride; a scorer's own images at the next stride


@dataclass
class RowSpec:
    name: str
    kind: str  # "teacher" | "student" | "real"
    steps: int
    path: str | None = None  # None: the configured teacher
    guidance_scale: float | None = None  # None: the model's own
    card: dict = field(default_factory=dict)
    group: str | None = None  # rows of one recipe trained with different seeds: the report gives their mean ± sd
    vae: str | None = None  # a tiny decoder (AutoencoderTiny folder) in place of the model's VAE
    compare_to: str | None = None  # the row (same steps) its paired differences are taken against; None: the teacher

    @property
    def method(self) -> str:
        return self.card.get("method", self.kind)

    @property
    def timesteps(self) -> list[int] | None:
        """The fixed timesteps the card samples at (a DMD student's T̄ is its one), or None."""
        return self.card.get("timesteps")

    @property
    def label(self) -> str:
        return self.name if self.kind == "real" else f"{self.name} ({steps_label(self.steps)})"


def steps_label(steps: int) -> str:
    return f"{steps} step" + ("" if steps == 1 else "s")


# ---- what to evaluate on and with ---------------------------------------------------------------
def build_prompt_set(eval_cfg: DictConfig, n: int | None, prompts: str | None = None,
                     real: str | None = None) -> PromptSet:
    """The preset's prompt set (`eval.prompts`, a `_target_`), or `prompts=FILE` from the command line."""
    if prompts is not None:
        return load_prompt_set(str(prompts), n, real)
    prompt_set = build(eval_cfg.prompts, n=n)
    if real is not None:
        from .prompts import image_folder

        prompt_set.real = image_folder(real)
    return prompt_set


def build_scorers(eval_cfg: DictConfig, context: ScoringContext) -> ScorerSet:
    """The scorers named in `eval.metrics`, built from `eval.scorers.<name>` — before any generation, so that
    missing weights fail in seconds, not hours."""
    metrics = list(eval_cfg.metrics or [])
    unknown = [m for m in metrics if m not in eval_cfg.scorers]
    if unknown:
        raise UserError(f"metrics={metrics}: no scorer named {unknown[0]!r} in this eval preset; use some of "
                        f"{', '.join(eval_cfg.scorers)}")
    return ScorerSet([build(eval_cfg.scorers[m], context=context) for m in metrics], context)


# ---- rows and their samplers --------------------------------------------------------------------
def sampler_args(row: RowSpec, model_cfg: DictConfig) -> dict:
    """The card's recipe (fixed timesteps, guidance), or the teacher's own; a row's guidance_scale wins."""
    own = model_cfg.get("guidance_scale") if row.kind == "teacher" else row.card.get("guidance_scale")
    guidance = row.guidance_scale if row.guidance_scale is not None else own
    return {"steps": row.steps, "guidance_scale": guidance, "timesteps": row.card.get("timesteps")}


def check_row_steps(row: RowSpec) -> None:
    if row.kind == "student":
        from pixsig_distill.students import SamplerSpec

        spec = SamplerSpec(row.method, row.card.get("num_inference_steps", 1), 1.0, row.card.get("timesteps"),
                           row.card)
        try:
            spec.check_steps(row.steps)
        except UserError as err:
            raise UserError(f"entry '{row.name}': {err}") from None


class Models:
    """Loads each model once; keeps the teacher and at most one student in memory."""

    def __init__(self, model_cfg: DictConfig, device: str, mode: InferenceMode | None, teacher=None):
        self.model_cfg, self.device, self.mode, self.loaded = model_cfg, device, mode or InferenceMode(), {}
        if teacher is not None:  # a training run hands over its teacher
            self.loaded[(True, None, None)] = teacher

    def get(self, row: RowSpec, prompts: list[str] | None = None):
        """The row's model, able to encode `prompts` (with text_encoder.release: T5 loaded alone, prompts encoded,
        T5 freed, before or after the model is loaded)."""
        key = (row.kind == "teacher", row.path, row.vae)
        if key not in self.loaded:
            for other in [k for k in self.loaded if not k[0]]:  # drop the previous student
                del self.loaded[other]
            gc.collect()
            self.loaded[key] = self._load(row, prompts)
        if prompts and not self.loaded[key].can_encode(prompts):  # e.g. a decoder's copy of a loaded teacher
            add_prompts(self.loaded[key], prompts, self.model_cfg, self.device, self.mode)
        return self.loaded[key]

    def _load(self, row: RowSpec, prompts):
        student = row.path if row.kind != "teacher" else None
        pretrained = row.path if row.kind == "teacher" else None
        if row.kind == "teacher" and row.path is None and row.vae is not None and (True, None, None) in self.loaded:
            # the configured teacher is loaded already: the same networks, another decoder
            from pixsig_distill.decoders import with_decoder

            return with_decoder(self.loaded[(True, None, None)], row.vae)
        return load_for_inference(self.model_cfg, student, self.device, self.mode, pretrained, prompts, row.vae)[0]


def row_vae(row: RowSpec, mode: InferenceMode | None) -> str | None:
    """The tiny decoder a row decodes with: its entry's `vae:`, else the run's `vae=`, else none (the VAE)."""
    return row.vae or (mode.vae if mode else None)


def row_settings(row: RowSpec, model_cfg: DictConfig, args: dict, mode: InferenceMode | None, device: str) -> dict:
    """Everything that shapes a row's images: its cache key is a hash of this (compile, offload and releasing T5
    do not change them; a quantized T5 does)."""
    dtype = mode.dtype if mode else None
    quantized = {"text_encoder_quantization": mode.quantization} if mode and mode.quantization != "none" else {}
    teacher = row.path if row.kind == "teacher" and row.path else str(model_cfg.pretrained)
    return {"method": row.method, "steps": row.steps, "guidance_scale": args["guidance_scale"],
            "timesteps": args["timesteps"], "path": str(Path(row.path).resolve()) if row.path else None,
            "weights": weights_fingerprint(row.path or teacher), "teacher": teacher,
            "teacher_weights": weights_fingerprint(teacher), "dtype": dtype or model_cfg.get("torch_dtype"),
            "resolution": model_cfg.get("resolution"), "max_sequence_length": model_cfg.get("max_sequence_length"),
            "device_type": device.split(":")[0], **quantized,
            **({"vae": str(decoder_folder(vae).resolve()), "vae_weights": weights_fingerprint(decoder_folder(vae))}
               if (vae := row_vae(row, mode)) else {})}


# ---- the engine ---------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """What `evaluate` needs besides the rows."""

    model_cfg: DictConfig
    prompt_set: PromptSet
    scorers: ScorerSet
    out: Path  # images are cached under out/cache (the teacher's under teacher_cache_dir when set)
    accelerator: object
    device: str
    seed: int = 0
    seed_sets: int = 1  # > 1: the main set again with other seeds; every figure gets its spread over sets
    batch_size: int = 250
    mode: InferenceMode | None = None  # dtype, compile, offload, text encoder (pixsig_distill/inference.py)
    teacher_cache_dir: Path | None = None  # the teacher's images, shared between runs (null: out/cache)
    latency: dict | None = None  # {modes, warmup, runs, batch_size}, timed on the main process
    teacher: object = None  # an already loaded teacher (a training run's)
    progress: bool = True  # a bar per row's generation (the end of a training run logs a line per row instead)
    compare_to: dict | None = None  # {name, steps}: the reference row of the paired comparisons (the teacher)

    def meta(self, teacher: str) -> dict:
        """What every report says about its figures: prompts, seeds, columns, scorers, bootstrap, date."""
        import datetime

        boot = self.scorers.context
        return {"prompts": self.prompt_set.source, "n_samples": len(self.prompt_set.prompts), "seed": self.seed,
                "seed_sets": self.seed_sets, "teacher": teacher, "compare_to": self.compare_to,
                "columns": [{**vars(c), "models": sorted(models)} for c, models in self.scorers.column_models()],
                "scorers": self.scorers.settings(),
                "bootstrap": {"resamples": boot.resamples, "confidence": boot.confidence, "seed": boot.seed,
                              "method": "percentile bootstrap over images"} if boot else None,
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}

    def image_sets(self, scorer: Scorer | None, k: int = 0) -> tuple[list[str], list[int], str]:
        """(prompts, seeds, cache label) of seed set k of the main set, or of a scorer's own images."""
        if scorer is None:
            prompts = self.prompt_set.prompts
            return prompts, [self.seed + k * SEED_SET_STRIDE + i for i in range(len(prompts))], f"s{k}"
        prompts = scorer.own_prompts()
        seeds = [self.seed + (self.seed_sets + 1) * SEED_SET_STRIDE + i for i in range(len(prompts))]
        # Scorers that ask for the same images (two diversities on two feature sets) share them: the label is the
        # prompts', not the scorer's.
        return prompts, seeds, "own-" + hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:12]


def _images(ev: Evaluation, row: RowSpec, models: Models, args: dict, prompts, seeds, label: str):
    settings = {**row_settings(row, ev.model_cfg, args, ev.mode, ev.device), "set": label}
    root = (ev.teacher_cache_dir if row.kind == "teacher" else None) or ev.out / "cache"
    cache = ImageCache(root / entry_key(f"{row.name}-{label}", row.steps, settings), settings,
                       ev.accelerator.process_index)
    generate_cached(lambda: models.get(row, prompts), cache, prompts, seeds, args["steps"], args["guidance_scale"],
                    args["timesteps"], ev.batch_size, ev.accelerator,
                    desc=f"generating {row.label}" + ("" if label == "s0" else f" [{label}]"), progress=ev.progress)
    return cache


def _latency(ev: Evaluation, model, args: dict) -> dict:
    from .latency import measure_latency

    lat, how = ev.latency, (ev.mode or InferenceMode()).describe(model)
    return {mode: {**measure_latency(model, ev.prompt_set.prompts[0], mode=mode, batch_size=lat["batch_size"],
                                     warmup=lat["warmup"], runs=lat["runs"], **args), "inference": how}
            for mode in lat["modes"]}


def _merge_seed_sets(result: dict, per_set: list[dict], scorers: ScorerSet) -> None:
    import numpy as np

    for column in scorers.columns:
        values = [s[column.key] for s in per_set if s.get(column.key) is not None]
        if len(values) > 1:
            result[f"{column.key}_seeds"] = values
            result[f"{column.key}_seed_std"] = float(np.std(values, ddof=1))


def shared_models(row: RowSpec, scorers: ScorerSet) -> dict[str, list[str]]:
    """Columns whose figures read a model that the row's training objective also read (its card's
    `objective_models`, matched by weights identity or by name): column key -> the shared models. Such a figure is
    not independent evidence about the row (a reward model scoring its own student)."""
    objective = row.card.get("objective_models") or {}
    shared = {}
    for column, models in scorers.column_models():
        names = sorted(name for name, identity in objective.items()  # named as the card names them
                       if name in models or identity in models.values())
        if names:
            shared[column.key] = names
    return shared


def evaluate(ev: Evaluation, rows: list[RowSpec]) -> tuple[list[dict], list]:
    """Every row's figures (on the main process; [] elsewhere) and the first images of each row for grids."""
    models = Models(ev.model_cfg, ev.device, ev.mode, ev.teacher)
    results, grids, paired = [], [], []  # paired: per row, {scorer name: its per-item values}
    main = ev.accelerator.is_main_process
    for row in rows:  # rows of one model are adjacent, so each model loads once
        result = {"name": row.name, "method": row.method, "kind": row.kind, "steps": row.steps, "timesteps": row.timesteps,
                  "path": row.path, "n_samples": len(ev.prompt_set.prompts), "group": row.group, "vae": row_vae(row, ev.mode),
                  "reference": row.compare_to, "not_independent": shared_models(row, ev.scorers) or None}
        if row.kind == "real":
            result.update(guidance_scale=None, latency={}, latency_ms=None, latency_transformer_ms=None,
                          latency_stages_ms=None)
            if main:
                for scorer in ev.scorers.scorers:
                    result.update(scorer.score_real(ev.prompt_set) or {})
                draw = ev.prompt_set.real_draw()
                grids.append(draw)
            results.append(result)
            paired.append({})
            continue
        args = sampler_args(row, ev.model_cfg)
        result["guidance_scale"] = args["guidance_scale"]
        main_sets = [_images(ev, row, models, args, *ev.image_sets(None, k)) for k in range(ev.seed_sets)]
        own = {s.name: _images(ev, row, models, args, *ev.image_sets(s))
               for s in ev.scorers.scorers if s.own_prompts() is not None}
        lat = _latency(ev, models.get(row, ev.prompt_set.prompts[:1]), args) if ev.latency and main else {}
        if main:
            n = len(ev.prompt_set.prompts)
            per_set, row_paired = [{} for _ in main_sets], {}
            for scorer in ev.scorers.scorers:
                if scorer.name in own:
                    prompts = scorer.own_prompts()
                    figures = scorer.score(own[scorer.name].files(len(prompts)), prompts)
                    row_paired[scorer.name] = figures.pop("paired", {})
                    per_set[0].update(figures)
                    continue
                for k, cache in enumerate(main_sets):
                    figures = scorer.score(cache.files(n), ev.prompt_set.prompts)
                    values = figures.pop("paired", {})
                    if k == 0:  # pairs are image for image: the first seed set
                        row_paired[scorer.name] = values
                    per_set[k].update(figures)
            paired.append(row_paired)
            result.update(per_set[0])
            _merge_seed_sets(result, per_set, ev.scorers)
            for mode, key in (("end_to_end", "latency_ms"), ("transformer", "latency_transformer_ms")):
                result[key] = {"median": lat[mode]["median"], "p90": lat[mode]["p90"]} if mode in lat else None
            stages = (lat.get("end_to_end") or {}).get("stages") or {}  # T5, transformer steps, VAE of the same runs
            result["latency_stages_ms"] = {name: s["median"] for name, s in stages.items()} or None
            result["latency"] = {mode: {k: v for k, v in rec.items() if k != "versions"} for mode, rec in lat.items()}
            result["cache"] = main_sets[0].folder.name
            grids.append(main_sets[0].files(n))
            log.info("evaluated %s: %s", row.label, "  ".join(
                f"{c.key} {result[c.key]:.{c.digits}f}" for c in ev.scorers.columns if result.get(c.key) is not None))
        results.append(result)
    if main:
        add_paired_differences(ev, results, paired)
    models.loaded.clear()
    gc.collect()
    return results, grids


def add_paired_differences(ev: Evaluation, results: list[dict], paired: list[dict]) -> None:
    """Every generated row against its reference row: the row its entry names (`compare_to`, at the same steps:
    e.g. a student with a tiny decoder against the same student with its VAE), else `ev.compare_to` (the teacher
    at 20 steps). Per column, the difference on the same prompts and seeds with a paired bootstrap interval and a
    verdict (scorer.py)."""
    def find(name: str, steps: int | None) -> int | None:
        return next((i for i, r in enumerate(results) if r["name"] == name and r["kind"] != "real"
                     and (steps is None or r["steps"] == steps)), None)

    default = find(ev.compare_to["name"], ev.compare_to.get("steps")) if ev.compare_to else None
    if ev.compare_to and default is None:
        log.warning("no row %s at %s steps to compare the others with: no paired differences",
                    ev.compare_to["name"], ev.compare_to.get("steps"))
    for i, result in enumerate(results):
        ref = find(result["reference"], result["steps"]) if result.get("reference") else default
        if ref is None or i == ref or result["kind"] == "real":
            continue
        result["compared_to"] = f"{results[ref]['name']} ({steps_label(results[ref]['steps'])})"
        for scorer in ev.scorers.scorers:
            for column in scorer.columns:
                mine, theirs = paired[i].get(scorer.name, {}), paired[ref].get(scorer.name, {})
                if column.key in mine and column.key in theirs:
                    result.update(paired_difference(scorer, column.key, mine[column.key], theirs[column.key],
                                                    column.better))


def evaluate_export(eval_cfg: DictConfig, model_cfg: DictConfig, teacher, export: str | Path, out_dir: str | Path,
                    device: str | None = None) -> dict:
    """The end of a training run: the student at its card's eval steps, the teacher at 20 steps (and at the
    student's largest step count), and the real ceiling, scored like the leaderboard; writes eval.md / .json /
    .csv and eval_grid.png into the run folder."""
    from . import report

    out_dir = Path(out_dir)
    rows = [RowSpec("real images (another draw)", "real", 0)] if eval_cfg.get("real_row") else []
    rows += decoder_rows(export) if (Path(export) / DECODER_CARD).is_file() else student_rows(eval_cfg, export)
    for row in rows:
        check_row_steps(row)
    device = device or str(teacher.device)
    prompt_set = build_prompt_set(eval_cfg, eval_cfg.n_samples)
    boot = eval_cfg.bootstrap
    context = ScoringContext(prompt_set, device, str(out_dir / "cache"), False, boot.resamples, boot.confidence,
                             boot.seed)
    scorers = build_scorers(eval_cfg, context)
    shared = Path(eval_cfg.teacher_cache_dir) if eval_cfg.get("teacher_cache_dir") else None
    ev = Evaluation(model_cfg, prompt_set, scorers, out_dir, _SingleProcess(), device, 0, eval_cfg.seed_sets,
                    eval_cfg.batch_size, None, teacher_cache_dir=shared, teacher=teacher, progress=False,
                    compare_to=reference_row(eval_cfg))
    results, images = evaluate(ev, rows)
    meta = {**ev.meta(str(model_cfg.pretrained)), "latency": None, "device": device}
    report.write_all(out_dir, "eval", results, meta, images, 8)
    return {"rows": results, "meta": meta}


def student_rows(eval_cfg: DictConfig, export) -> list[RowSpec]:
    """A student export: the teacher at 20 steps (and at the student's largest step count), the student at its
    card's eval steps."""
    from pixsig_distill.students import read_card

    card = read_card(export)
    steps = list(eval_cfg.get("steps") or card.get("eval_steps") or [card.get("num_inference_steps", 1)])
    rows = [RowSpec("teacher", "teacher", s) for s in sorted({20, max(steps)}, reverse=True) if s > 1 or s == 20]
    return rows + [RowSpec(card.get("method", "student"), "student", s, str(export), None, card) for s in steps]


def decoder_rows(export) -> list[RowSpec]:
    """A tiny decoder export: the teacher (20 steps), and the student it was trained on if any, each with its VAE
    and with the tiny decoder, the latter compared image for image with the former."""
    import json

    from pixsig_distill.students import read_card

    card = json.loads((Path(export) / DECODER_CARD).read_text())
    rows = [RowSpec("teacher", "teacher", 20),
            RowSpec("teacher + tiny decoder", "teacher", 20, vae=str(export), compare_to="teacher")]
    if card.get("student"):
        student = read_card(card["student"])
        method, steps = student.get("method", "student"), student.get("num_inference_steps", 1)
        rows += [RowSpec(method, "student", steps, card["student"], None, student),
                 RowSpec(f"{method} + tiny decoder", "student", steps, card["student"], None, student,
                         vae=str(export), compare_to=method)]
    return rows


def reference_row(eval_cfg: DictConfig) -> dict | None:
    """The eval preset's reference row for paired comparisons ({name, steps}), or None."""
    from omegaconf import OmegaConf

    node = eval_cfg.get("compare_to")
    return OmegaConf.to_container(node, resolve=True) if node else None


class _SingleProcess:
    """The accelerator interface `evaluate` uses, for one process inside a training run (its own accelerator
    may span several processes; the evaluation runs on the main one only)."""

    process_index, is_main_process, is_local_main_process = 0, True, True

    def wait_for_everyone(self) -> None:
        pass

    def split_between_processes(self, items):
        from contextlib import nullcontext

        return nullcontext(items)
