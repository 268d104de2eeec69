"""Fine-tune the teacher on captioned images: plain diffusion training, full or LoRA.

The loss is the DDPM "simple" loss on the ε channels, E‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, c)‖² with
t ~ U{0..999} (Ho et al. 2020, eq. 14). PixArt-Σ also predicts a variance in its other channels (learned σ,
trained by the base model with improved DDPM's variational-bound term); those channels get no gradient
here. Nothing this toolkit ships reads them: the diffusers pipeline and our samplers drop them and step
with the fixed schedule (DPM-Solver++, DDPM at T̄, LCM), so training them would cost a second loss for
an output no sampler uses. A full fine-tune moves the shared trunk, so their values drift: an ancestral
sampler with learned variances would need that term back.

Caption dropout (the empty prompt for a fraction of the batch) keeps classifier-free guidance working; the
EMA of the trained weights is what is exported, as a stock diffusers pipeline (LoRA: merged, plus the
adapter in peft format) that any training command takes as `model.pretrained=`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..draws import StepDraws, step_draws
from ..distributed import full_parameters
from ..errors import UserError
from ..lora import check_rank
from ..sampling import sample_latents
from ..schedule import add_noise
from .base import Method
from .common import EMA, TrainableParameters, accumulated_step, export_network, trained_network, trained_parameters


class FineTune(Method):
    method_name = "finetune"
    MEMORY_SAVERS = {"8-bit AdamW (bitsandbytes, CUDA)": {"distill.optimizer._target_": "pixsig_distill.optim.adamw_8bit"}}  # plan.fit

    def __init__(self, teacher, *, lora_rank: int, lora_alpha: float | None, lora_target_modules,
                 caption_dropout: float, ema_decay: float | None, optimizer, grad_clip: float | None,
                 gradient_checkpointing: bool, full_pipeline_export: bool):
        """Every setting is required: conf/distill/finetune.yaml is the one home of the defaults."""
        if not 0 <= caption_dropout < 1:
            raise UserError(f"distill.caption_dropout={caption_dropout}; use a fraction in [0, 1) (0.1 keeps CFG)")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise UserError(f"distill.ema_decay={ema_decay}; use a number in [0, 1), or null for no EMA")
        self.teacher = teacher
        self.lora_rank = check_rank(lora_rank) if lora_rank else 0
        self.lora_alpha = lora_alpha or lora_rank
        self.caption_dropout = caption_dropout
        self.grad_clip = grad_clip
        self.full_pipeline_export = full_pipeline_export
        self.transformer = trained_network(teacher.transformer, self.lora_rank, self.lora_alpha,
                                           list(lora_target_modules), gradient_checkpointing)
        self.ema = None if ema_decay is None else EMA(self.transformer, ema_decay)
        self.models = {"transformer": self.transformer}
        self.optimizers = {"transformer": optimizer([p for _, p in trained_parameters(self.transformer)])}
        self.accelerator = None

    # ---- loop interface ---------------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        network = self.unwrap(self.transformer)
        modules = {"transformer": TrainableParameters(network) if self.lora_rank else network}
        if self.ema is not None:
            modules["transformer_ema"] = self.ema
        return modules

    def prepare(self, accelerator) -> None:
        self.prepare_networks(accelerator, self.grad_clip)

    def train_step(self, batch: dict, gen: torch.Generator | StepDraws, micro_batches: int = 1) -> dict:
        gen = step_draws(gen)
        if "latents" not in batch:
            raise UserError("distill=finetune trains on images: use data=images data.folder=DIR (a folder of images "
                            "with captions.txt or metadata.jsonl)")
        x0, embeds, mask = batch["latents"].float(), batch["embeds"], batch["mask"]
        b, device = x0.shape[0], x0.device
        t = gen.randint(0, self.teacher.scheduler.config.num_train_timesteps, b).to(device)
        noise = gen.randn(tuple(x0.shape)).to(device)
        dropped = (gen.rand(b) < self.caption_dropout).to(device)
        if self.caption_dropout > 0:  # the empty prompt for dropped rows: the unconditional branch CFG needs
            # (not `dropped.any()`: the planner runs this step on fake tensors, which have no values to branch on)
            null_embeds, null_mask = self.teacher.null_embedding(b, embeds.shape[1])
            embeds = torch.where(dropped[:, None, None], null_embeds.to(embeds.dtype), embeds)
            mask = torch.where(dropped[:, None], null_mask.to(mask.dtype), mask)
        denoiser = self.teacher.denoiser
        x_t = add_noise(x0, noise, t, denoiser.alphas_cumprod)
        parts = [slice(i * b // micro_batches, (i + 1) * b // micro_batches) for i in range(micro_batches)]

        def micro_loss(rows: slice):
            eps = denoiser.eps(x_t[rows].to(self.teacher.dtype), t[rows], embeds[rows], mask[rows],
                                   transformer=self.transformer).float()
            return F.mse_loss(eps, noise[rows]) / len(parts)  # Ho et al. 2020, eq. 14

        loss, grad_norm = accumulated_step(self.accelerator, self.transformer, self.optimizers["transformer"],
                                           [partial(micro_loss, rows) for rows in parts], self.grad_clip)
        if self.ema is not None:
            with full_parameters(self.accelerator, self.transformer) as network:
                self.ema.update(network)
        return {"loss_eps": loss, "grad_norm": grad_norm}

    # ---- inference and export -----------------------------------------------------------------
    def sampling_network(self):
        """The fine-tuned transformer the export holds: its EMA weights when it has an EMA (a context manager)."""
        return self.ema_or_self(self.unwrap(self.transformer), self.ema)

    @torch.no_grad()
    def sample(self, embeds, mask, noise) -> torch.Tensor:
        """The teacher's own sampler (steps, CFG) with the fine-tuned weights."""
        with self.sampling_network() as network:
            null = self.teacher.null_embedding(embeds.shape[0], embeds.shape[1])
            denoiser, scale = self.teacher.denoiser, self.teacher.guidance_scale

            def eps_fn(x, t):
                return denoiser.guided_eps(x, t, embeds, mask, scale, null=null, transformer=network)

            return sample_latents(eps_fn, self.teacher.scheduler, noise, self.teacher.num_inference_steps)

    def card(self) -> dict:
        """A fine-tuned teacher samples like the teacher: its scheduler, steps and CFG."""
        steps = self.teacher.num_inference_steps
        card = {"method": self.method_name, "num_inference_steps": steps, "guidance_scale": self.teacher.guidance_scale,
                "scheduler": type(self.teacher.scheduler).__name__, "eval_steps": [steps]}
        if self.lora_rank:
            card.update(lora="lora", lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
        return card

    def export(self, out_dir: Path) -> Path:
        with torch.no_grad(), self.sampling_network() as network:
            return export_network(self.teacher, network, self.teacher.scheduler, out_dir, self.card(),
                                  self.full_pipeline_export, lora=bool(self.lora_rank))
