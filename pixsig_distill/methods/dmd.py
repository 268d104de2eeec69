"""DMD: distribution matching distillation into a one-step generator G(z, T̄, text).

Follows the PixArt-Σ DMD recipe (DMD1 + regression; Yin et al. 2024, "One-step Diffusion with
Distribution Matching Distillation"), with DMD2's two time-scale rule as an option:
- generator G, initialised from the teacher and fed the fixed timestep label T̄;
- real score: the frozen teacher with classifier-free guidance;
- fake score: a trainable copy of the teacher fitted (ε-MSE) to G's current samples;
- the distribution-matching gradient ∇ = x̂0_fake − x̂0_real, normalised per sample;
- an optional regression loss on teacher noise→image pairs.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from diffusers import DDPMScheduler

from ..distributed import full_parameters
from ..errors import UserError
from ..sampling import sample_latents
from ..schedule import add_noise, scheduler_like, x0_from_eps
from .common import ema_update, export_pipeline, frozen_copy, optimizer_step, trainable_copy


def dm_gradient(x0_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The distribution-matching gradient on the generator's samples (DMD eq. 7–8).

    ∇ = (x̂0_fake − x̂0_real) / mean_{C,H,W}|x̂0 − x̂0_real|: the fake score's denoised estimate minus
    the real one, normalised per sample so that its scale does not depend on the noise level.
    """
    dims = tuple(range(1, x0_hat.ndim))
    weight = 1.0 / ((x0_hat - x0_real).abs().mean(dim=dims, keepdim=True) + 1e-5)
    return (x0_fake - x0_real) * weight


def dm_loss(x0_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·‖x̂0 − sg(x̂0 − ∇)‖² (mean): its gradient w.r.t. x̂0 is ∇ / numel, the DMD update direction."""
    return 0.5 * F.mse_loss(x0_hat.float(), (x0_hat - grad).detach().float())


class DMD:
    def __init__(self, teacher, t_bar: int = 400, real_guidance_scale: float = 3.0, fake_updates_per_step: int = 1,
                 dm_t_min: int = 20, dm_t_max: int = 980, generator_optimizer=None, fake_optimizer=None,
                 grad_clip: float | None = 10.0, ema_decay: float = 0.9999, regression_weight: float = 0.0,
                 regression_distance: str = "latent_mse", pairs=None, regression_batch_size: int = 8,
                 gradient_checkpointing: bool = False,
                 full_pipeline_export: bool = True):
        if isinstance(t_bar, bool) or not isinstance(t_bar, int) or not 1 <= t_bar <= 999:
            raise UserError(f"t_bar={t_bar!r} is out of range; DMD's start timestep must be an integer in 1..999 "
                            f"(the PixArt-Σ recipe uses 400)")
        if fake_updates_per_step < 1:
            raise UserError(f"distill.fake_updates_per_step={fake_updates_per_step}; use an integer >= 1")
        if not 0 <= dm_t_min < dm_t_max <= 999:
            raise UserError(f"distill.dm_t_min/dm_t_max = {dm_t_min}/{dm_t_max}; need 0 <= min < max <= 999")
        if regression_weight > 0 and pairs is None:
            raise UserError("distill.regression_weight > 0 needs teacher pairs; make them with "
                            "python -m pixsig_distill.make_pairs and set distill.pairs.folder=..., or set "
                            "distill.regression_weight=0")
        if regression_distance not in ("latent_mse", "lpips"):
            raise UserError(f"distill.regression_distance={regression_distance!r}; use latent_mse or lpips")
        self.teacher = teacher
        self.t_bar = t_bar
        self.real_guidance_scale = real_guidance_scale
        self.fake_updates_per_step = fake_updates_per_step
        self.dm_t_range = (dm_t_min, dm_t_max)
        self.grad_clip = grad_clip
        self.ema_decay = ema_decay
        self.regression_weight = regression_weight
        self.regression_distance = regression_distance
        self.pairs = pairs
        self.regression_batch_size = regression_batch_size
        self.full_pipeline_export = full_pipeline_export
        self._lpips = None

        self.generator = trainable_copy(teacher.transformer, gradient_checkpointing)
        self.fake_score = trainable_copy(teacher.transformer, gradient_checkpointing)
        self.generator_ema = frozen_copy(self.generator)
        make_opt = generator_optimizer or partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.01)
        self.models = {"generator": self.generator, "fake_score": self.fake_score}
        self.optimizers = {"generator": make_opt(self.generator.parameters()),
                           "fake_score": (fake_optimizer or make_opt)(self.fake_score.parameters())}
        self.accelerator = None

    # ---- loop interface ---------------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        unwrap = self.accelerator.unwrap_model if self.accelerator else (lambda m: m)
        return {"generator": unwrap(self.generator), "fake_score": unwrap(self.fake_score),
                "generator_ema": self.generator_ema}

    def prepare(self, accelerator) -> None:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise UserError("distill=dmd trains two networks (generator and fake score) and accelerate's DeepSpeed "
                            "integration prepares one trained network per run; launch DMD with "
                            "pixsig_distill/conf/accelerate/fsdp_shard_grad_op.yaml or ddp.yaml (docs/scaling.md)")
        self.accelerator = accelerator
        self.generator_ema.to(accelerator.device)
        (self.generator, self.fake_score, self.optimizers["generator"],
         self.optimizers["fake_score"]) = accelerator.prepare(self.generator, self.fake_score,
                                                              self.optimizers["generator"], self.optimizers["fake_score"])
        self.models = {"generator": self.generator, "fake_score": self.fake_score}

    def train_step(self, batch: dict, gen: torch.Generator) -> dict[str, float]:
        acc = self.accelerator
        embeds, mask = batch["embeds"], batch["mask"]
        logs = {}
        # Generator update: the distribution-matching loss (+ regression).
        with acc.accumulate(self.generator), acc.autocast():
            x0_hat = self.generate(self.generator, embeds, mask, self._noise(embeds.shape[0], gen))
            loss_dm = self.distribution_matching_loss(x0_hat, embeds, mask, gen)
            loss = loss_dm
            logs["loss_dm"] = loss_dm.item()
            if self.regression_weight > 0:
                loss_reg = self.regression_loss(gen)
                loss = loss + self.regression_weight * loss_reg
                logs["loss_reg"] = loss_reg.item()
            logs["grad_norm_generator"] = optimizer_step(acc, self.generator, self.optimizers["generator"], loss,
                                                         self.grad_clip)
        if acc.sync_gradients:
            with full_parameters(acc, self.generator) as generator:  # gathered if sharded (FSDP, ZeRO-3)
                ema_update(self.generator_ema, generator, self.ema_decay)
        # Fake-score updates (two time-scale rule: several per generator update, DMD2 §4.1).
        samples = x0_hat.detach()
        for i in range(self.fake_updates_per_step):
            if i > 0:
                with torch.no_grad(), acc.autocast():
                    samples = self.generate(self.generator, embeds, mask, self._noise(embeds.shape[0], gen))
            with acc.accumulate(self.fake_score), acc.autocast():
                loss_fake = self.fake_score_loss(samples, embeds, mask, gen)
                logs["grad_norm_fake"] = optimizer_step(acc, self.fake_score, self.optimizers["fake_score"],
                                                        loss_fake, self.grad_clip)
        logs["loss_fake"] = loss_fake.item()
        return logs

    # ---- the method -------------------------------------------------------------------------
    def _noise(self, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        shape = self.teacher.latent_shape(batch_size)
        return torch.randn(shape, generator=gen).to(self.teacher.device)

    def _timesteps(self, batch_size: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(low, high + 1, (batch_size,), generator=gen).to(self.teacher.device)

    def generate(self, generator, embeds, mask, z: torch.Tensor) -> torch.Tensor:
        """One step: x̂0 = (z − √(1−ᾱ_T̄)·ε_G(z, T̄)) / √ᾱ_T̄, with z ~ N(0, I) unscaled (PixArt DMD)."""
        t = torch.full((z.shape[0],), self.t_bar, device=z.device, dtype=torch.long)
        eps = self.teacher.eps(z, t, embeds, mask, transformer=generator).float()
        return x0_from_eps(z.float(), eps, t, self.teacher.alphas_cumprod)

    def distribution_matching_loss(self, x0_hat, embeds, mask, gen) -> torch.Tensor:
        """DMD eq. 7–8: ∇_x̂0 KL ≈ (x̂0_fake − x̂0_real) / mean|x̂0 − x̂0_real| at a random noise level t."""
        t = self._timesteps(x0_hat.shape[0], *self.dm_t_range, gen)
        noise = torch.randn(x0_hat.shape, generator=gen).to(x0_hat.device)
        with torch.no_grad():
            x_t = add_noise(x0_hat.detach(), noise, t, self.teacher.alphas_cumprod)
            x0_real = self.teacher.x0(x_t, t, embeds, mask, guidance_scale=self.real_guidance_scale)
            x0_fake = self.teacher.x0(x_t, t, embeds, mask, guidance_scale=1.0, transformer=self.fake_score)
            grad = dm_gradient(x0_hat.detach(), x0_real, x0_fake)
        return dm_loss(x0_hat, grad)

    def fake_score_loss(self, samples, embeds, mask, gen) -> torch.Tensor:
        """Denoising score matching on the generator's (detached) samples: plain ε-MSE, conditional only."""
        t = self._timesteps(samples.shape[0], 0, 999, gen)
        noise = torch.randn(samples.shape, generator=gen).to(samples.device)
        x_t = add_noise(samples, noise, t, self.teacher.alphas_cumprod)
        eps = self.teacher.eps(x_t.to(self.teacher.dtype), t, embeds, mask, transformer=self.fake_score).float()
        return F.mse_loss(eps, noise)

    def regression_loss(self, gen) -> torch.Tensor:
        """Distance between G(z_i) and the teacher's multi-step sample y_i from the same noise (DMD eq. 9)."""
        index = torch.randint(0, len(self.pairs), (self.regression_batch_size,), generator=gen).tolist()
        items = [self.pairs[i] for i in index]
        device = self.teacher.device
        z = torch.stack([it["noise"] for it in items]).to(device)
        target = torch.stack([it["latents"] for it in items]).to(device).float()
        embeds = torch.stack([it["embeds"] for it in items]).to(device, self.teacher.dtype)
        mask = torch.stack([it["mask"] for it in items]).to(device)
        x0 = self.generate(self.generator, embeds, mask, z)
        if self.regression_distance == "latent_mse":
            return F.mse_loss(x0, target)
        return self._lpips_distance(x0, target)

    def _lpips_distance(self, x0, target) -> torch.Tensor:
        if self._lpips is None:
            try:
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                self._lpips = LearnedPerceptualImagePatchSimilarity(net_type="vgg").to(x0.device).eval()
            except Exception as err:
                raise UserError(f"LPIPS needs VGG weights that could not be loaded ({err}); download them "
                                f"where there is internet or use distill.regression_distance=latent_mse") from None
        decode = self.teacher.vae.decode
        scale = self.teacher.vae.config.scaling_factor
        images = decode(x0 / scale).sample.clamp(-1, 1)
        with torch.no_grad():
            targets = decode(target / scale).sample.clamp(-1, 1)
        return self._lpips(images.float(), targets.float())

    # ---- inference and export -----------------------------------------------------------------
    def scheduler(self) -> DDPMScheduler:
        """One DDPM step from T̄ to the end of the chain returns x̂0: the released DMD model's inference."""
        return scheduler_like(DDPMScheduler, self.teacher.scheduler.config, clip_sample=False, thresholding=False,
                              variance_type="fixed_small")

    @torch.no_grad()
    def sample(self, embeds, mask, noise) -> torch.Tensor:
        """The EMA generator's one-step sample, through the same scheduler the exported pipeline uses."""
        def eps_fn(x, t):
            return self.teacher.eps(x, t, embeds, mask, transformer=self.generator_ema)

        return sample_latents(eps_fn, self.scheduler(), noise, timesteps=[self.t_bar])

    def export(self, out_dir: Path) -> Path:
        card = {"method": "dmd", "t_bar": self.t_bar, "num_inference_steps": 1, "timesteps": [self.t_bar],
                "guidance_scale": 1.0, "scheduler": "DDPMScheduler"}
        return export_pipeline(self.teacher, self.generator_ema, self.scheduler(), out_dir, card,
                               self.full_pipeline_export)
