"""Load any model this toolkit makes — the teacher or an exported student — as one sampler.

An export folder carries `pixsig_student.json` (method, steps or timesteps, guidance); a full
export is a complete diffusers pipeline, a transformer-only export borrows T5 and the VAE from the
teacher it was distilled from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .methods.common import STUDENT_CARD
from .teacher import Teacher, load_pipeline


@dataclass
class SamplerSpec:
    """How a model samples by default: the teacher 20 DPM-Solver++ steps with CFG, DMD one step at T̄."""

    method: str
    num_inference_steps: int
    guidance_scale: float
    timesteps: list[int] | None = None
    card: dict = field(default_factory=dict)


def read_card(folder: str | Path) -> dict:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"student folder '{folder}' does not exist; pass the export/ folder of a training run")
    card = folder / STUDENT_CARD
    if not card.is_file():
        raise UserError(f"'{folder}' is not a student export (no {STUDENT_CARD}); pass the export/ folder of a "
                        f"training run")
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"'{card}' is corrupt ({err}); re-export the student") from None


def load_student(folder: str | Path, teacher_cfg: dict, device: str = "auto", dtype: str | None = None
                 ) -> tuple[Teacher, SamplerSpec]:
    """A student export as a `Teacher`-shaped sampler (same encode/sample/decode calls)."""
    card = read_card(folder)
    torch_dtype = dtype or teacher_cfg.get("torch_dtype", "float32")
    if card.get("full_pipeline"):
        pipe = load_pipeline(str(folder), torch_dtype=torch_dtype)
    else:  # T5, tokenizer and VAE come from the teacher; transformer and scheduler from the export
        from diffusers import DDPMScheduler, LCMScheduler

        pipe = load_pipeline(teacher_cfg["pretrained"], transformer=str(folder), torch_dtype=torch_dtype)
        scheduler_cls = {"DDPMScheduler": DDPMScheduler, "LCMScheduler": LCMScheduler}[card["scheduler"]]
        pipe.scheduler = scheduler_cls.from_pretrained(str(Path(folder) / "scheduler"))
    model = Teacher(pipe, max_sequence_length=teacher_cfg.get("max_sequence_length", 300),
                    guidance_scale=card.get("guidance_scale", 1.0), num_inference_steps=card["num_inference_steps"],
                    device=device)  # the resolution is the student transformer's own
    spec = SamplerSpec(card["method"], card["num_inference_steps"], card.get("guidance_scale", 1.0),
                       card.get("timesteps"), card)
    return model, spec


def teacher_spec(teacher: Teacher) -> SamplerSpec:
    return SamplerSpec("teacher", teacher.num_inference_steps, teacher.guidance_scale)
