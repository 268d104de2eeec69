"""The README.md model card of an export, in the model-hub convention.

YAML front matter (`base_model`, `library_name: diffusers`, `pipeline_tag: text-to-image`, `tags`,
`license` carried from the teacher where known), then what the student is (method, timesteps or T̄,
guidance, scheduler), how it was trained, its end-of-run evaluation with the protocol, a sample grid
and the stock-diffusers snippet that reproduces the samples. Everything is read from the export's
`pixsig_student.json` and what the training run hands over, so a method adds nothing here.

The card is written at export and rewritten when the training facts and the evaluation are known.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

STUDENT_CARD = "pixsig_student.json"  # the sampling recipe an export carries
DECODER_CARD = "pixsig_decoder.json"  # what a tiny decoder export (distill=tiny_decoder) decodes

CARD_FILE = "README.md"
SAMPLES_FILE = "samples.png"
# Licences of teachers we know by name (the PixArt models are released under CreativeML Open RAIL++-M).
KNOWN_LICENSES = {"PixArt-alpha/": "openrail++"}
PACKAGE_LICENSE = "apache-2.0"  # the shipped toy teacher is part of this package
EXAMPLE_PROMPT = "a large red circle in the center on a white background"


def teacher_license(teacher: str | None) -> str | None:
    """The teacher's licence: its own card's front matter, a known hub organisation, or this package's toy."""
    if not teacher:
        return None
    readme = Path(teacher) / CARD_FILE
    if readme.is_file():
        match = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace").split("\n---", 1)[0], re.M)
        if match:
            return match.group(1)
    for prefix, license_ in KNOWN_LICENSES.items():
        if teacher.startswith(prefix):
            return license_
    if Path(teacher).resolve().is_relative_to(Path(__file__).resolve().parent / "toy"):
        return PACKAGE_LICENSE
    return None


def snippet(card: dict, folder: str, prompt: str = EXAMPLE_PROMPT) -> str:
    """Python that samples this student with stock diffusers, as the evaluation does (seed 0)."""
    pipeline = card.get("pipeline", "PixArtSigmaPipeline")
    steps = card.get("num_inference_steps", 1)
    args = [f"num_inference_steps={steps}"]
    if card.get("timesteps"):
        args.append(f"timesteps={list(card['timesteps'])}")
    args.append(f"guidance_scale={card.get('guidance_scale', 1.0)}")
    if (card.get("resolution") or 1024) < 256:
        args.append("use_resolution_binning=False")  # the pipeline's aspect-ratio bins start at 256 px
    lines = ["import torch", f"from diffusers import {pipeline}"]
    if card.get("full_pipeline", True):
        lines.append(f'pipe = {pipeline}.from_pretrained("{folder}")')
    else:  # transformer/ + scheduler/ on top of the teacher's T5 and VAE
        scheduler = card.get("scheduler", "DDPMScheduler")
        lines[1] = f"from diffusers import {pipeline}, PixArtTransformer2DModel, {scheduler}"
        lines += [f'transformer = PixArtTransformer2DModel.from_pretrained("{folder}/transformer")',
                  f'scheduler = {scheduler}.from_pretrained("{folder}/scheduler")',
                  f'pipe = {pipeline}.from_pretrained("{card.get("teacher")}", transformer=transformer, '
                  f"scheduler=scheduler)"]
    lines += [f'image = pipe("{prompt}", {", ".join(args)},',
              "             generator=torch.Generator().manual_seed(0)).images[0]",
              'image.save("sample.png")']
    return "\n".join(lines)


def _front_matter(card: dict) -> str:
    teacher = card.get("teacher")
    license_ = teacher_license(teacher)
    tags = ["pixsig-distill", card.get("method", "student"), "distillation", "text-to-image", "pixart"]
    lines = ["---"]
    if teacher:
        lines.append(f"base_model: {teacher}")
    lines += ["library_name: diffusers", "pipeline_tag: text-to-image", "tags:"] + [f"- {t}" for t in tags]
    if license_:
        lines.append(f"license: {license_}")
    return "\n".join(lines + ["---", ""])


def _recipe(card: dict) -> list[str]:
    steps = card.get("num_inference_steps", 1)
    lines = [f"- method: **{card.get('method')}** ({steps} step{'s' if steps != 1 else ''})",
             f"- scheduler: `{card.get('scheduler')}`" + (f", timesteps {card['timesteps']}" if card.get("timesteps")
                                                           else "")]
    if card.get("t_bar") is not None:
        lines.append(f"- start timestep T̄ = {card['t_bar']}")
    if card.get("original_inference_steps"):
        lines.append(f"- any step count up to {card['original_inference_steps']} (trained on that grid); "
                     f"evaluated at {card.get('eval_steps')}")
    guidance = float(card.get("guidance_scale", 1.0))
    lines += [f"- guidance scale: {card.get('guidance_scale', 1.0)} "
              + ("(classifier-free guidance: two transformer passes a step)" if guidance > 1
                 else "(no classifier-free guidance at sampling)"),
              f"- resolution: {card.get('resolution')} px; teacher: `{card.get('teacher')}`",
              f"- files: {'a complete pipeline' if card.get('full_pipeline', True) else 'transformer/ + scheduler/ (T5 and VAE: the teacher’s)'}"
              + ("; `lora/`: the adapter in peft format" if card.get("lora") else "")]
    return lines


def _fmt(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def cell(row: dict, column: dict) -> str:
    """`0.21 [0.19, 0.24]`: the value and its 95 % interval; ± the spread over seed sets when there are several."""
    key, digits = column["key"], column["digits"]
    text = _fmt(row.get(key), digits)
    if row.get(f"{key}_lo") is not None:
        text += f" [{_fmt(row[f'{key}_lo'], digits)}, {_fmt(row[f'{key}_hi'], digits)}]"
    if row.get(f"{key}_seed_std") is not None:
        text += f" ±{_fmt(row[f'{key}_seed_std'], digits)}"
    return text


def _training(training: dict) -> list[str]:
    lines = ["## Training", ""]
    for key, value in training.items():
        lines.append(f"- {key}: {value}")
    return lines + [""]


def _evaluation(evaluation: dict) -> list[str]:
    rows, meta = evaluation["rows"], evaluation["meta"]
    columns = meta["columns"]
    lines = ["## Evaluation", "",
             f"{meta['n_samples']} prompts of `{meta['prompts']}`, the same seeds for every row; "
             f"brackets: 95 % intervals ({meta['bootstrap']['method']}, {meta['bootstrap']['resamples']} resamples).",
             "", "| row | steps | " + " | ".join(c["header"] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for r in rows:
        cells = " | ".join(cell(r, c) for c in columns)
        lines.append(f"| {r['name']} | {r['steps'] if r.get('kind') != 'real' else ''} | {cells} |")
    lines += [""] + [f"- {name}: " + "; ".join(f"{k}: {v}" for k, v in settings.items()
                                                if v is not None and k not in ("resamples",))
                     for name, settings in meta.get("scorers", {}).items()]
    return lines + [""]


def decoder_snippet(card: dict, folder: str, prompt: str = EXAMPLE_PROMPT) -> str:
    """Python that samples the teacher (or the student the decoder was trained with) through this tiny decoder."""
    source = card.get("student") or card.get("teacher")
    return "\n".join(["import torch", "from diffusers import AutoencoderTiny, PixArtSigmaPipeline",
                      f'vae = AutoencoderTiny.from_pretrained("{folder}")',
                      f'pipe = PixArtSigmaPipeline.from_pretrained("{source}", vae=vae)  # any PixArt model of this VAE',
                      f'image = pipe("{prompt}", generator=torch.Generator().manual_seed(0)).images[0]',
                      'image.save("sample.png")'])


def write_model_card(export: str | Path, training: dict | None = None, evaluation: dict | None = None,
                     samples: str | Path | None = None) -> Path:
    """(Re)write `export/README.md` from the export's card (a student's, or a tiny decoder's) and whatever is known
    about its training and evaluation; `samples` (an image) is copied in as samples.png."""
    export = Path(export)
    decoder = (export / DECODER_CARD).is_file()
    card = json.loads((export / (DECODER_CARD if decoder else STUDENT_CARD)).read_text())
    if samples is not None and Path(samples).is_file():
        shutil.copyfile(samples, export / SAMPLES_FILE)
    teacher_name = Path(str(card.get('teacher') or 'a teacher')).name
    if decoder:
        lines = [_front_matter(card), f"# Tiny decoder for {teacher_name}", "",
                 "diffusers `AutoencoderTiny` (the TAESD architecture), distilled with pixsig-distill to decode the "
                 "latents of its PixArt teacher's VAE; a pipeline takes it as `vae=`. Only the decoder is trained: "
                 "encode with the teacher's VAE.", "",
                 f"- latents: {card.get('latent_channels')} channels, ×{card.get('vae_scale_factor')} upsampling, "
                 f"{card.get('resolution')} px; trained on encoded real images"
                 + (f" and the samples of `{card['student']}`" if card.get("student") else ""), ""]
    else:
        title = f"{card.get('method', 'student').upper()} student of {teacher_name}"
        lines = [_front_matter(card), f"# {title}", "",
                 "Distilled with pixsig-distill from a PixArt teacher; it samples with the stock diffusers pipeline "
                 "below.", "", "## Sampling recipe", "", *_recipe(card), ""]
    if training:
        lines += _training(training)
    if evaluation:
        lines += _evaluation(evaluation)
    if (export / SAMPLES_FILE).is_file():
        lines += ["## Samples", "", f"![samples]({SAMPLES_FILE})", ""]
    use = (decoder_snippet if decoder else snippet)(card, str(export.resolve()))
    lines += ["## Use", "", "```python", use, "```", ""]
    path = export / CARD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
