"""`python -m pixsig_distill.merge_lora base=BASE lora=RUN/export/lora out_dir=DIR`: a LoRA adapter (lcm_lora,
a DMD LoRA generator, finetune_lora) merged into a base PixArt pipeline, written as a student export that
`generate student=DIR` and stock `PixArtSigmaPipeline.from_pretrained(DIR)` both load.

The adapter carries its own recipe: the card (method, steps, guidance, fixed timesteps) and the scheduler it was
exported with (`lora/scheduler/`), so a merged DMD LoRA keeps its timesteps and a merged fine-tune keeps its
DPM-Solver and CFG.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers

from omegaconf import DictConfig

from .config import check_int
from .errors import UserError
from .lora import check_lora_folder, load_lora, read_lora_card
from .methods.common import export_pipeline
from .methods.lcm import lcm_scheduler
from .teacher import Teacher, load_pipeline, resolve_dtype
from .console import entry_point


def merge_lora(cfg: DictConfig) -> Path:
    for key in ("base", "lora", "out_dir"):
        if not cfg.get(key):
            raise UserError(f"no {key}=; usage: python -m pixsig_distill.merge_lora base=TEACHER lora=RUN/export/lora "
                            f"out_dir=DIR")
    lora = check_lora_folder(Path(str(cfg.lora)))
    card = read_lora_card(lora)  # before loading a large base
    if not card.get("method"):
        raise UserError(f"'{lora}' has no pixsig_lora.json card saying how its student samples; pass the export/lora "
                        f"folder of a pixsig-distill run")
    dtype = resolve_dtype(cfg.torch_dtype or "float32")
    steps = card.get("num_inference_steps")
    if cfg.num_inference_steps is not None:
        steps = check_int(cfg, "num_inference_steps", 1)
        if card.get("timesteps"):
            raise UserError(f"num_inference_steps: this {card['method']} adapter samples at its fixed timesteps "
                            f"{card['timesteps']}; leave num_inference_steps=null")
        if steps > card.get("original_inference_steps", steps):
            raise UserError(f"num_inference_steps={steps} exceeds the adapter's "
                            f"{card['original_inference_steps']}-step training grid")
    pipe = load_pipeline(str(cfg.base), torch_dtype="float32")  # merge in float32, cast afterwards
    merged = load_lora(pipe.transformer, lora).merge_and_unload()
    teacher = Teacher(pipe, device="cpu")
    # merged: the export holds no lora/ folder (the card's `lora` names one), only the adapter it came from
    out = {**{k: v for k, v in card.items() if k != "lora"}, "num_inference_steps": steps, "base": str(cfg.base),
           "merged_lora": str(cfg.lora)}
    scheduler = _adapter_scheduler(lora, card, pipe.scheduler.config)
    merged = merged.to(dtype)
    path = export_pipeline(teacher, merged, scheduler, Path(str(cfg.out_dir)), out, cfg.full_pipeline)
    print(f"merged {cfg.lora} into {cfg.base} → {path}")
    return path


def _adapter_scheduler(lora: Path, card: dict, base_config):
    """The scheduler the adapter was exported with; adapters written before it was saved beside them are LCM-LoRAs,
    whose scheduler the card describes."""
    config = lora / "scheduler" / "scheduler_config.json"
    if config.is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get("_class_name", "")
        scheduler_class = getattr(diffusers, name, None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
            raise UserError(f"'{config}' names no diffusers scheduler ({name!r}); re-export the adapter")
        return scheduler_class.from_pretrained(str(config.parent))
    if card.get("scheduler") == "LCMScheduler":
        return lcm_scheduler(base_config, card.get("original_inference_steps", 50), card.get("timestep_scaling", 10.0))
    raise UserError(f"'{lora}' carries no scheduler/ for its {card.get('scheduler')} recipe (written by an older "
                    f"version); re-export the adapter")


main = entry_point("merge_lora", merge_lora)


if __name__ == "__main__":
    main()
