"""`python -m pixsig_distill.merge_lora base=BASE lora=RUN/export/lora out_dir=DIR`: an LCM-LoRA adapter
merged into a base PixArt pipeline, written as a student export (LCMScheduler + `pixsig_student.json`)
that `generate student=DIR` and stock `PixArtSigmaPipeline.from_pretrained(DIR)` both load.
"""

from __future__ import annotations

from pathlib import Path

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
    card = read_lora_card(check_lora_folder(Path(str(cfg.lora))))  # before loading a large base
    dtype = resolve_dtype(cfg.torch_dtype or "float32")
    steps = card.get("num_inference_steps", 4) if cfg.num_inference_steps is None else \
        check_int(cfg, "num_inference_steps", 1)
    original = card.get("original_inference_steps", 50)
    if steps > original:
        raise UserError(f"num_inference_steps={steps} exceeds the adapter's {original}-step training grid")
    pipe = load_pipeline(str(cfg.base), torch_dtype="float32")  # merge in float32, cast afterwards
    merged = load_lora(pipe.transformer, Path(str(cfg.lora))).merge_and_unload()
    teacher = Teacher(pipe, device="cpu")
    scheduler = lcm_scheduler(pipe.scheduler.config, original, card.get("timestep_scaling", 10.0))
    out = {**card, "method": "lcm_lora", "num_inference_steps": steps, "guidance_scale": 1.0,
           "scheduler": "LCMScheduler", "original_inference_steps": original, "base": str(cfg.base),
           "lora": str(cfg.lora)}
    merged = merged.to(dtype)
    path = export_pipeline(teacher, merged, scheduler, Path(str(cfg.out_dir)), out, cfg.full_pipeline)
    print(f"merged {cfg.lora} into {cfg.base} → {path}")
    return path


main = entry_point("merge_lora", merge_lora)


if __name__ == "__main__":
    main()
