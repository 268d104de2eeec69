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

import contextlib
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from diffusers import DDPMScheduler

from ..draws import StepDraws, step_draws
from ..distributed import full_parameters
from ..errors import UserError
from ..lora import DEFAULT_TARGETS
from ..sampling import sample_latents
from ..schedule import add_noise, scheduler_like, x0_from_eps
from .common import (EMA, TrainableParameters, accumulated_step, export_network, frozen, lora_network,
                     micro_slices, trainable_copy, trained_network, trained_parameters, weight_sharing_copy)


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


def _lora_spec(spec, name: str) -> tuple[int, float | None]:
    """distill.<name>: {lora_rank: 0 (a full trained copy) or r > 0 (LoRA adapters), lora_alpha: null (= rank)}."""
    spec = dict(spec or {})
    rank, alpha = spec.get("lora_rank", 0), spec.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise UserError(f"distill.{name}.lora_rank={rank!r}; use 0 (a full trained copy) or a positive LoRA rank "
                        f"such as 64")
    return rank, alpha


class DMD:
    fake_t_range = (0, 999)  # the fake score's ε-MSE timesteps: every noise level

    def __init__(self, teacher, t_bar: int = 400, real_guidance_scale: float = 3.0, fake_updates_per_step: int = 1,
                 dm_t_min: int = 20, dm_t_max: int = 980, generator_optimizer=None, fake_optimizer=None,
                 grad_clip: float | None = 10.0, ema_decay: float | None = 0.9999, ema_device: str = "same",
                 generator=None, fake_score=None, lora_target_modules=DEFAULT_TARGETS,
                 regression_weight: float = 0.0, regression_distance: str = "latent_mse", pairs=None,
                 regression_batch_size: int = 8, gradient_checkpointing: bool = False,
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
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise UserError(f"distill.ema_decay={ema_decay}; use a number in [0, 1), or null for no EMA")
        if ema_device not in ("same", "cpu"):
            raise UserError(f"distill.ema_device={ema_device!r}; use same (the generator's device) or cpu")
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

        # Memory-lean options (docs/real_scale.md): the generator and the fake score are each a full float32 copy
        # of the teacher or LoRA adapters. A LoRA fake score sits on the frozen teacher's own weights (the real score
        # is the same base without adapters), so DMD then holds one frozen base instead of a second trained network.
        targets = list(lora_target_modules)
        self.generator_lora_rank, gen_alpha = _lora_spec(generator, "generator")
        self.fake_lora_rank, fake_alpha = _lora_spec(fake_score, "fake_score")
        self.generator = trained_network(teacher.transformer, self.generator_lora_rank, gen_alpha, targets,
                                         gradient_checkpointing)
        if self.fake_lora_rank:  # adapters on a copy that shares the teacher's weights: the teacher stays as it was
            self.fake_score = lora_network(weight_sharing_copy(teacher.transformer), self.fake_lora_rank, fake_alpha,
                                           targets, gradient_checkpointing)
        else:
            self.fake_score = trainable_copy(teacher.transformer, gradient_checkpointing)
        self.generator_ema = (None if ema_decay is None else
                              EMA(self.generator, ema_decay, "cpu" if ema_device == "cpu" else None))
        make_opt = generator_optimizer or partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.01)
        self.models = {"generator": self.generator, "fake_score": self.fake_score}
        self.optimizers = {"generator": make_opt([p for _, p in trained_parameters(self.generator)]),
                           "fake_score": (fake_optimizer or make_opt)([p for _, p in trained_parameters(self.fake_score)])}
        self.accelerator = None

    # ---- loop interface ---------------------------------------------------------------------
    def _unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.accelerator else model

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        """Full networks as state dicts of the transformer; LoRA networks as their adapters only."""
        modules = {}
        for name, lora_rank in (("generator", self.generator_lora_rank), ("fake_score", self.fake_lora_rank)):
            network = self._unwrap(self.models[name])
            modules[name] = TrainableParameters(network) if lora_rank else network
        if self.generator_ema is not None:
            modules["generator_ema"] = self.generator_ema
        return modules

    def prepare(self, accelerator) -> None:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise UserError("distill=dmd trains two networks (generator and fake score) and accelerate's DeepSpeed "
                            "integration trains one model per run; launch DMD with "
                            "pixsig_distill/conf/accelerate/fsdp2_shard_grad_op.yaml (sharded) or ddp.yaml "
                            "(docs/scaling.md)")
        self.accelerator = accelerator
        # One prepare call per network with its optimizer: FSDP2 takes one model per call.
        self.generator, self.optimizers["generator"] = accelerator.prepare(self.generator, self.optimizers["generator"])
        self.fake_score, self.optimizers["fake_score"] = accelerator.prepare(self.fake_score,
                                                                             self.optimizers["fake_score"])
        self.models = {"generator": self.generator, "fake_score": self.fake_score}

    def train_step(self, batch: dict, gen: torch.Generator | StepDraws, micro_batches: int = 1) -> dict[str, float]:
        """One generator update, then `fake_updates_per_step` fake-score updates, each over `micro_batches`
        micro-batches of the batch (gradient accumulation: the same update as the whole batch at once).
        Returns the losses and gradient norms as tensors (the loop reads them)."""
        gen = step_draws(gen)
        acc = self.accelerator
        embeds, mask = batch["embeds"], batch["mask"]
        b = embeds.shape[0]
        # Every random draw of the step is made for the whole batch first and then sliced, so that n micro-batches
        # see the very numbers that one batch of n× the size sees.
        draws = self.draw_inputs(b, gen)
        t_dm, noise_dm = self._timesteps(b, *self.dm_t_range, gen), self._noise(b, gen)
        extra = self.draw_extra(b, gen)
        reg_rows = self._regression_rows(gen) if self.regression_weight > 0 else None
        fake_draws = [(self.draw_inputs(b, gen) if i > 0 else None, self._timesteps(b, *self.fake_t_range, gen),
                       self._noise(b, gen)) for i in range(self.fake_updates_per_step)]
        parts = micro_slices(b, micro_batches)
        logs = {}

        def log(name: str, value: torch.Tensor) -> None:
            logs[name] = logs.get(name, 0.0) + value.detach() / len(parts)

        # Generator update: the distribution-matching loss (+ the regression loss on its own batch, once per step).
        samples = [None] * len(parts)

        def generator_loss(i: int, rows: slice):
            x_in, t_in = self.generator_input(draws, rows, embeds[rows], mask[rows])
            x0_hat = self.generate(self.generator, embeds[rows], mask[rows], x_in, t_in)
            samples[i] = x0_hat.detach()
            loss = self.distribution_matching_loss(x0_hat, embeds[rows], mask[rows], t_dm[rows], noise_dm[rows])
            log("loss_dm", loss)
            for name, term, weight in self.generator_extra_losses(x0_hat, embeds[rows], mask[rows], extra, rows):
                log(name, term)
                loss = loss + weight * term
            loss = loss / len(parts)
            if reg_rows is not None and i == 0:
                loss_reg = self.regression_loss(reg_rows)
                logs["loss_reg"] = loss_reg.detach()
                loss = loss + self.regression_weight * loss_reg
            return loss

        # The fake score is frozen while the generator learns (DMD2's GAN term reads through it): no gradient for it,
        # and, checkpointed, its forward is recomputed in the backward under the requires_grad state it ran with.
        with frozen(self._unwrap(self.fake_score)):
            _, logs["grad_norm_generator"] = accumulated_step(
                acc, self.generator, self.optimizers["generator"],
                [partial(generator_loss, i, rows) for i, rows in enumerate(parts)], self.grad_clip)
        if self.generator_ema is not None:
            with full_parameters(acc, self.generator) as generator:  # gathered if sharded (FSDP, ZeRO-3)
                self.generator_ema.update(generator)

        # Fake-score updates (two time-scale rule: several per generator update, DMD2 §4.1), on the generator's
        # samples: those of the update above first, then fresh ones from the updated generator.
        def fake_loss(update: int, i: int, rows: slice):
            fresh, t, noise = fake_draws[update]
            x0 = samples[i]
            if fresh is not None:
                with torch.no_grad():
                    x_in, t_in = self.generator_input(fresh, rows, embeds[rows], mask[rows])
                    x0 = self.generate(self.generator, embeds[rows], mask[rows], x_in, t_in)
            loss = self.fake_score_loss(x0, embeds[rows], mask[rows], t[rows], noise[rows])
            for name, term, weight in self.fake_extra_losses(x0, embeds[rows], mask[rows], extra, rows, update):
                logs[name] = term.detach()
                loss = loss + weight * term
            return loss / len(parts)

        for update in range(self.fake_updates_per_step):
            logs["loss_fake"], logs["grad_norm_fake"] = accumulated_step(
                acc, self.fake_score, self.optimizers["fake_score"],
                [partial(fake_loss, update, i, rows) for i, rows in enumerate(parts)], self.grad_clip)
        return logs

    # ---- what a subclass changes (DMD2: backward simulation, the GAN) ----------------------------
    def draw_inputs(self, batch_size: int, gen: StepDraws) -> dict:
        """The randomness behind the generator's inputs: pure noise z (PixArt DMD: fed unscaled at label T̄)."""
        return {"z": self._noise(batch_size, gen)}

    def generator_input(self, draws: dict, rows: slice, embeds, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, t) the generator denoises for these rows; t None: T̄."""
        return draws["z"][rows], None

    def draw_extra(self, batch_size: int, gen: StepDraws) -> dict:
        return {}

    def generator_extra_losses(self, x0_hat, embeds, mask, extra: dict, rows: slice) -> list:
        """[(log name, loss, weight)] added to the generator's loss."""
        return []

    def fake_extra_losses(self, x0, embeds, mask, extra: dict, rows: slice, update: int) -> list:
        """[(log name, loss, weight)] added to the fake score's loss."""
        return []

    # ---- the method -------------------------------------------------------------------------
    def _noise(self, batch_size: int, gen: StepDraws) -> torch.Tensor:
        return gen.randn(self.teacher.latent_shape(batch_size)).to(self.teacher.device)

    def _timesteps(self, batch_size: int, low: int, high: int, gen: StepDraws) -> torch.Tensor:
        return gen.randint(low, high + 1, batch_size).to(self.teacher.device)

    def generate(self, generator, embeds, mask, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """One step: x̂0 = (z − √(1−ᾱ_t)·ε_G(z, t)) / √ᾱ_t at t = T̄, with z ~ N(0, I) unscaled (PixArt DMD)."""
        if t is None:
            t = torch.full((z.shape[0],), self.t_bar, device=z.device, dtype=torch.long)
        eps = self.teacher.eps(z, t, embeds, mask, transformer=generator).float()
        return x0_from_eps(z.float(), eps, t, self.teacher.alphas_cumprod)

    def distribution_matching_loss(self, x0_hat, embeds, mask, t, noise) -> torch.Tensor:
        """DMD eq. 7–8: ∇_x̂0 KL ≈ (x̂0_fake − x̂0_real) / mean|x̂0 − x̂0_real| at the noise level t."""
        with torch.no_grad():
            x_t = add_noise(x0_hat.detach(), noise, t, self.teacher.alphas_cumprod)
            x0_real = self.real_x0(x_t, t, embeds, mask)
            x0_fake = self.fake_x0(x_t, t, embeds, mask)
            grad = dm_gradient(x0_hat.detach(), x0_real, x0_fake)
        return dm_loss(x0_hat, grad)

    def real_x0(self, x_t, t, embeds, mask) -> torch.Tensor:
        """The frozen teacher's (guided) x̂0: the real score."""
        return self.teacher.x0(x_t, t, embeds, mask, guidance_scale=self.real_guidance_scale)

    def fake_x0(self, x_t, t, embeds, mask) -> torch.Tensor:
        return self.teacher.x0(x_t, t, embeds, mask, guidance_scale=1.0, transformer=self.fake_score)

    def fake_score_loss(self, samples, embeds, mask, t, noise) -> torch.Tensor:
        """Denoising score matching on the generator's (detached) samples: plain ε-MSE, conditional only."""
        x_t = add_noise(samples, noise, t, self.teacher.alphas_cumprod)
        eps = self.teacher.eps(x_t.to(self.teacher.dtype), t, embeds, mask, transformer=self.fake_score).float()
        return F.mse_loss(eps, noise)

    def _regression_rows(self, gen: StepDraws) -> list[int]:
        return gen.randint(0, len(self.pairs), self.regression_batch_size).tolist()  # per process, like batch_size

    def regression_loss(self, rows: list[int]) -> torch.Tensor:
        """Distance between G(z_i) and the teacher's multi-step sample y_i from the same noise (DMD eq. 9)."""
        items = [self.pairs[i] for i in rows]
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

    def sampling_network(self):
        """The generator the student is: its EMA weights when it has an EMA (a context manager)."""
        generator = self._unwrap(self.generator)
        return self.generator_ema.applied(generator) if self.generator_ema is not None else contextlib.nullcontext(generator)

    @torch.no_grad()
    def sample(self, embeds, mask, noise) -> torch.Tensor:
        """The (EMA) generator's one-step sample, through the same scheduler the exported pipeline uses."""
        with self.sampling_network() as generator:
            def eps_fn(x, t):
                return self.teacher.eps(x, t, embeds, mask, transformer=generator)

            return sample_latents(eps_fn, self.scheduler(), noise, timesteps=[self.t_bar])

    def card(self) -> dict:
        """The sampling recipe the export carries (pixsig_student.json): one DDPM step at T̄."""
        return {"method": "dmd", "t_bar": self.t_bar, "num_inference_steps": 1, "timesteps": [self.t_bar],
                "guidance_scale": 1.0, "scheduler": "DDPMScheduler", "eval_steps": [1]}

    def export(self, out_dir: Path) -> Path:
        """A stock diffusers pipeline of the (EMA) generator; a LoRA generator is merged into a full transformer
        and its adapter is written beside it in peft format (export/lora)."""
        card = self.card()
        if self.generator_lora_rank:
            card.update(lora="lora", lora_rank=self.generator_lora_rank)
        with torch.no_grad(), self.sampling_network() as generator:
            return export_network(self.teacher, generator, self.scheduler(), out_dir, card, self.full_pipeline_export,
                                  lora=bool(self.generator_lora_rank))
