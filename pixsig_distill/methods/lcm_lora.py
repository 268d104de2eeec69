"""LCM-LoRA: latent consistency distillation into LoRA adapters on a frozen teacher copy.

Luo et al. 2023b ("LCM-LoRA") as PixArt-δ trains it: the same skipping-step consistency loss as
`LCM`, but only rank-r adapters (peft) on the attention, feed-forward and adaLN linears are trained,
and the online LoRA model itself gives the target under no-grad (no EMA copy). The export holds the
merged student (a stock pipeline with LCMScheduler) and the adapter in peft format under `lora/`
(`PeftModel.from_pretrained(transformer, export/lora)`; `python -m pixsig_distill.merge_lora` merges
it into any compatible base).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch


from ..errors import UserError
from ..lora import check_rank
from .common import TrainableParameters, export_network, lora_network
from .lcm import LCM


class LCMLoRA(LCM):
    method_name = "lcm_lora"

    def __init__(self, teacher, *, lora_rank: int, lora_alpha: float | None, lora_target_modules, **kwargs):
        if kwargs.get("w_embedding"):
            raise UserError("distill=lcm_lora does not support w_embedding (a peft adapter has no place for the "
                            "w-embedding); use distill=lcm distill.w_embedding=true, or a fixed distill.guidance_w")
        self.lora_rank = check_rank(lora_rank)
        self.lora_alpha = lora_alpha or lora_rank
        self.lora_target_modules = list(lora_target_modules)
        super().__init__(teacher, **kwargs)

    def _build_networks(self, gradient_checkpointing: bool):
        """Student = LoRA on a frozen copy of the teacher (in the teacher's dtype); no separate target network."""
        student = lora_network(copy.deepcopy(self.teacher.transformer), self.lora_rank, self.lora_alpha,
                               self.lora_target_modules, gradient_checkpointing)
        return student, None

    def target_network(self):
        return self.student  # PixArt-δ's LCM-LoRA: the online model under no-grad gives the target

    def update_target(self) -> None:
        pass

    def sampling_network(self):
        return self.student

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        return {"lora": TrainableParameters(self.unwrap(self.student))}

    def card(self) -> dict:
        return {**super().card(), "lora": "lora", "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}

    def export(self, out_dir: Path) -> Path:
        return export_network(self.teacher, self.unwrap(self.student), self.scheduler(), out_dir, self.card(),
                              self.full_pipeline_export, lora=True)
