"""Load any model this toolkit makes — the teacher or an exported student — as one sampler.

An export folder carries `pixsig_student.json`, the sampling recipe: the diffusers scheduler class,
the default step count, fixed `timesteps` (a DMD student samples exactly at them) or the grid its
step counts must fit (`original_inference_steps`), the guidance scale and `eval_steps`, the step
counts it is evaluated at. Everything that samples reads the recipe from there, so nothing switches
on method names. A full export is a complete diffusers pipeline; a transformer-only export borrows
T5 and the VAE from the teacher it was distilled from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .model_card import DECODER_CARD, STUDENT_CARD
from .teacher import Teacher, load_pipeline


@dataclass
class SamplerSpec:
    """How a model samples by default: the teacher 20 DPM-Solver++ steps with CFG, DMD one step at T̄."""

    method: str
    num_inference_steps: int
    guidance_scale: float
    timesteps: list[int] | None = None
    card: dict = field(default_factory=dict)

    @property
    def eval_steps(self) -> list[int]:
        """The step counts this model is evaluated at (an LCM card says [1, 2, 4])."""
        return list(self.card.get("eval_steps") or [self.num_inference_steps])

    def check_steps(self, steps: int) -> None:
        """A step count this sampler can run, or one line that says which it can."""
        if self.timesteps is not None and steps != len(self.timesteps):
            raise UserError(f"steps={steps}: this {self.method} student samples at the fixed timesteps "
                            f"{self.timesteps}; use steps={len(self.timesteps)}")
        original = self.card.get("original_inference_steps")
        if original is not None and steps > original:
            raise UserError(f"steps={steps}: this {self.method} student was trained on a {original}-step grid; "
                            f"use steps <= {original} (it is made for 1 to 8)")


def read_card(folder: str | Path) -> dict:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"student folder '{folder}' does not exist; pass the export/ folder of a training run")
    card = folder / STUDENT_CARD
    if not card.is_file() and (folder / DECODER_CARD).is_file():
        raise UserError(f"'{folder}' is a tiny decoder export (distill=tiny_decoder), not a student; give it as "
                        f"vae={folder}, and a student's export/ folder here")
    if not card.is_file():
        raise UserError(f"'{folder}' is not a student export (no {STUDENT_CARD}); pass the export/ folder of a "
                        f"training run")
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"'{card}' is corrupt ({err}); re-export the student") from None


def load_student(folder: str | Path, teacher_cfg: dict, device: str = "auto", dtype: str | None = None,
                 text_encoder_quantization=None, load_text_encoder: bool = True) -> tuple[Teacher, SamplerSpec]:
    """A student export as a `Teacher`-shaped sampler (same encode/sample/decode calls)."""
    card = read_card(folder)
    torch_dtype = dtype or teacher_cfg.get("torch_dtype", "float32")
    text = {"text_encoder_quantization": text_encoder_quantization, "load_text_encoder": load_text_encoder}
    if card.get("full_pipeline"):
        pipe = load_pipeline(str(folder), torch_dtype=torch_dtype, **text)
    else:  # T5, tokenizer and VAE come from the teacher; transformer and scheduler from the export
        pipe = load_pipeline(teacher_cfg["pretrained"], transformer=str(folder), torch_dtype=torch_dtype, **text)
        pipe.scheduler = scheduler_class(card).from_pretrained(str(Path(folder) / "scheduler"))
    model = Teacher(pipe, max_sequence_length=teacher_cfg.get("max_sequence_length", 300),
                    guidance_scale=card.get("guidance_scale", 1.0), num_inference_steps=card["num_inference_steps"],
                    device=device)  # the resolution is the student transformer's own
    spec = SamplerSpec(card["method"], card["num_inference_steps"], card.get("guidance_scale", 1.0),
                       card.get("timesteps"), card)
    return model, spec


def scheduler_class(card: dict):
    """The diffusers scheduler class the card names."""
    import diffusers

    cls = getattr(diffusers, str(card.get("scheduler")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UserError(f"the student card names scheduler {card.get('scheduler')!r}, which is not a diffusers "
                        f"scheduler; re-export the student")
    return cls


def teacher_spec(teacher: Teacher) -> SamplerSpec:
    return SamplerSpec("teacher", teacher.num_inference_steps, teacher.guidance_scale)


def student_on_teacher(folder: str | Path, teacher: Teacher) -> tuple[Teacher, SamplerSpec]:
    """A student export's transformer and scheduler on the teacher's own T5, VAE and device: a sampler that costs
    one more transformer, not a second T5 (what `distill=tiny_decoder` draws the student's samples from)."""
    from .teacher import _load_transformer, pipeline_class

    card = read_card(folder)
    transformer = _load_transformer(str(folder), teacher.dtype)
    if transformer.config.in_channels != teacher.latent_channels or transformer.config.sample_size * \
            teacher.vae_scale_factor != teacher.resolution:
        raise UserError(f"student '{folder}' makes other latents than this teacher ({teacher.resolution} px, "
                        f"{teacher.latent_channels} channels); give a student distilled from model.pretrained")
    scheduler = scheduler_class(card).from_pretrained(str(Path(folder) / "scheduler"))
    components = {**teacher.pipe.components, "transformer": transformer, "scheduler": scheduler}
    model = Teacher(pipeline_class(transformer)(**components), max_sequence_length=teacher.max_sequence_length,
                    guidance_scale=card.get("guidance_scale", 1.0), num_inference_steps=card["num_inference_steps"],
                    device=str(teacher.device))
    if teacher._null is not None:  # no T5 (cached text): the teacher's cached empty prompt serves CFG
        model.set_null_embedding(*teacher._null)
    spec = SamplerSpec(card["method"], card["num_inference_steps"], card.get("guidance_scale", 1.0),
                       card.get("timesteps"), card)
    return model, spec
