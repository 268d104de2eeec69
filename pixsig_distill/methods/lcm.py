"""LCM: latent consistency distillation into a few-step student f(x_t, t, text).

Luo et al. 2023, "Latent Consistency Models" (Algorithm 1, latent consistency distillation), as
PixArt-δ applies it to PixArt:
- student f_θ, initialised from the teacher, in the consistency parameterisation (LCM §4.1)
  f(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t), x̂0 from its ε prediction (learned-σ channels dropped);
- target f_θ⁻ = EMA of the student (decay 0.95); the frozen teacher is the ODE solver;
- skipping-step DDIM solver on the grid {19, 39, …, 999} (50 steps, k = 20; LCM §4.3):
  x_{t_n} = DDIM(x_{t_{n+k}} → t_n) with the guided teacher ε (LCM §4.2);
- loss d(f_θ(x_{t_{n+k}}, t_{n+k}), sg f_θ⁻(x_{t_n}, t_n)): pseudo-Huber (c = 0.001) or L2.

Choices, and why:
- t_n = t_{n+k} − k clamped at 0, as diffusers' LCM distillation example does (its DDIM solver
  uses ᾱ_0 as the "previous" ᾱ of the first grid point); there f(x, 0) = x, the boundary condition.
- Guidance: w follows the LCM/PixArt-δ convention ε_w = ε_c + w·(ε_c − ε_u). Our `Denoiser.guided_eps`
  uses ε_u + s·(ε_c − ε_u), so w = s − 1: `guidance_w: 4.5` (PixArt-δ) is CFG scale s = 5.5. The key
  is named `guidance_w`, not `guidance_scale`, so that it cannot be confused with the s of the rest
  of the project (model.guidance_scale, DMD's real_guidance_scale).
- `w_embedding: true` is the LCM paper's variant: w ~ U[w_min, w_max] per sample, fed to the student
  through a grafted w-embedding (methods/guidance_embedding.py). The export bakes one w (`export_w`,
  default `guidance_w`) into the weights, so stock diffusers still loads the student.
- Where x_{t_{n+k}} comes from without images: LCM noises data latents, x_{t_{n+k}} ~ q(x | x0). We
  use the teacher's own samples as x0 (data-free distillation, methods/teacher_samples.py): from teacher pairs
  on disk, or made here once per prompt and cached. Running the teacher's 50-step DDIM chain to a random t_{n+k}
  for every batch was the other faithful option, at up to 50 guided teacher calls per step and never amortised:
  too slow on CPU.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from diffusers import LCMScheduler

from ..draws import StepDraws, step_draws
from ..distributed import full_parameters
from ..errors import UserError
from ..sampling import sample_latents
from ..schedule import (add_noise, ddim_step, lcm_boundary_scalings, scheduler_like, skipping_step_grid,
                        x0_from_eps)
from .base import Method
from .common import accumulated_step, ema_update, export_pipeline, frozen_copy, micro_slices, trainable_copy
from .guidance_embedding import add_guidance_embedding, bake_guidance, guidance
from .teacher_samples import TeacherSamples


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, loss: str = "huber", huber_c: float = 0.001
                         ) -> torch.Tensor:
    """Pseudo-Huber mean(√((f − f⁻)² + c²) − c) (Song & Dhariwal 2023, §3.3; LCM-LoRA, PixArt-δ) or MSE."""
    diff = pred.float() - target.float()
    if loss == "l2":
        return diff.pow(2).mean()
    return ((diff.pow(2) + huber_c**2).sqrt() - huber_c).mean()


def lcm_scheduler(config, original_inference_steps: int = 50, timestep_scaling: float = 10.0) -> LCMScheduler:
    """diffusers' LCM sampler over the teacher's ᾱ schedule, on the grid the student was trained on."""
    return scheduler_like(LCMScheduler, config, original_inference_steps=original_inference_steps,
                          timestep_scaling=timestep_scaling, prediction_type="epsilon", clip_sample=False,
                          thresholding=False, set_alpha_to_one=True, steps_offset=0, rescale_betas_zero_snr=False)


def _int_in(name: str, value, low: int, high: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"distill.{name}={value!r}; use an integer in {low}..{high} ({hint})")
    return value


class LCM(Method):
    method_name = "lcm"
    MEMORY_SAVERS = {"8-bit AdamW (bitsandbytes, CUDA)": {"distill.optimizer._target_": "pixsig_distill.optim.adamw_8bit"}}  # plan.fit

    def __init__(self, teacher, *, num_ddim_timesteps: int, num_inference_steps: int, guidance_w: float,
                 w_embedding: bool, w_min: float, w_max: float, export_w: float | None, ema_decay: float, loss: str,
                 huber_c: float, timestep_scaling: float, optimizer, grad_clip: float | None, pair_steps: int | None,
                 pair_guidance_scale: float | None, pair_cache_size: int, seed: int, gradient_checkpointing: bool,
                 full_pipeline_export: bool):
        """Every setting is required: conf/distill/lcm.yaml is the one home of the defaults, with what each means."""
        n_train = teacher.scheduler.config.num_train_timesteps
        _int_in("num_ddim_timesteps", num_ddim_timesteps, 1, n_train, "LCM and PixArt-δ use 50")
        _int_in("num_inference_steps", num_inference_steps, 1, num_ddim_timesteps, "at most num_ddim_timesteps")
        if pair_steps is not None:
            _int_in("pair_steps", pair_steps, 1, n_train, "or null for the teacher's own steps")
        if loss not in ("huber", "l2"):
            raise UserError(f"distill.loss={loss!r}; use huber or l2")
        if huber_c <= 0:
            raise UserError(f"distill.huber_c={huber_c}; use a positive number (LCM-LoRA uses 0.001)")
        if not 0 <= ema_decay < 1:
            raise UserError(f"distill.ema_decay={ema_decay}; use a number in [0, 1) (PixArt-δ uses 0.95)")
        if guidance_w < 0 or (w_embedding and not 0 <= w_min < w_max):
            raise UserError(f"distill.guidance_w={guidance_w}, w_min={w_min}, w_max={w_max}; need w >= 0 and "
                            f"0 <= w_min < w_max (w = CFG scale − 1)")
        if w_embedding and export_w is not None and not w_min <= export_w <= w_max:
            raise UserError(f"distill.export_w={export_w} lies outside the trained range [{w_min}, {w_max}]")
        self.teacher = teacher
        self.grid = skipping_step_grid(n_train, num_ddim_timesteps).to(teacher.device)
        self.k = n_train // num_ddim_timesteps
        self.num_ddim_timesteps = num_ddim_timesteps
        self.num_inference_steps = num_inference_steps
        self.guidance_w = guidance_w
        self.w_embedding = w_embedding
        self.w_range = (w_min, w_max)
        self.export_w = guidance_w if export_w is None else export_w
        self.ema_decay = ema_decay
        self.loss, self.huber_c = loss, huber_c
        self.timestep_scaling = timestep_scaling
        self.grad_clip = grad_clip
        self.samples = TeacherSamples(teacher, pair_steps, pair_guidance_scale, pair_cache_size, seed)
        self.full_pipeline_export = full_pipeline_export
        self.accelerator = None

        self.student, self.target = self._build_networks(gradient_checkpointing)
        self.models = {"student": self.student}
        self.optimizers = {"student": optimizer([p for p in self.student.parameters() if p.requires_grad])}

    def _build_networks(self, gradient_checkpointing: bool):
        """Student = trainable teacher copy (+ w-embedding); target = its EMA."""
        student = trainable_copy(self.teacher.transformer, gradient_checkpointing)
        if self.w_embedding:
            add_guidance_embedding(student)
        return student, frozen_copy(student)

    # ---- loop interface ---------------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.unwrap(self.student), "target": self.target}

    def prepare(self, accelerator) -> None:
        if self.target is not None:
            self.target.to(accelerator.device)
        self.prepare_networks(accelerator, self.grad_clip)

    def train_step(self, batch: dict, gen: torch.Generator | StepDraws, micro_batches: int = 1) -> dict[str, float]:
        acc, gen = self.accelerator, step_draws(gen)
        embeds, mask = batch["embeds"], batch["mask"]
        x0 = self.clean_latents(batch)
        b, device, ac = x0.shape[0], x0.device, self.teacher.denoiser.alphas_cumprod
        # Skipping-step pair (t_{n+k}, t_n) on the DDIM grid, and x_{t_{n+k}} ~ q(x | x0); drawn for the whole
        # batch, then sliced into micro-batches (accumulation sees the numbers one large batch sees).
        t_start = self.grid[gen.randint(0, len(self.grid), b).to(self.grid.device)].to(device)
        t_end = (t_start - self.k).clamp(min=0)
        x_start = add_noise(x0, gen.randn(x0.shape).to(device), t_start, ac)
        w = self._sample_w(b, gen).to(device)
        parts = micro_slices(b, micro_batches)

        def micro_loss(rows: slice):
            pred = self.consistency_fn(self.student, x_start[rows], t_start[rows], embeds[rows], mask[rows], w[rows])
            with torch.no_grad():
                eps = self.teacher_eps(x_start[rows], t_start[rows], embeds[rows], mask[rows], w[rows]).float()
                x_end = ddim_step(x_start[rows], eps, t_start[rows], t_end[rows], ac)
                target = self.consistency_fn(self.target_network(), x_end, t_end[rows], embeds[rows], mask[rows],
                                             w[rows])
            return consistency_distance(pred, target, self.loss, self.huber_c) / len(parts)

        loss, grad_norm = accumulated_step(acc, self.student, self.optimizers["student"],
                                           [partial(micro_loss, rows) for rows in parts], self.grad_clip)
        self.update_target()
        return {"loss_lcm": loss, "grad_norm": grad_norm}

    # ---- the method -------------------------------------------------------------------------
    def target_network(self):
        return self.target

    def update_target(self) -> None:
        with full_parameters(self.accelerator, self.student) as student:  # gathered if sharded (FSDP, ZeRO-3)
            ema_update(self.target, student, self.ema_decay)

    def _sample_w(self, batch_size: int, gen: StepDraws) -> torch.Tensor:
        if not self.w_embedding:
            return torch.full((batch_size,), float(self.guidance_w))
        low, high = self.w_range
        return low + (high - low) * gen.rand(batch_size)

    def consistency_fn(self, model, x_t, t, embeds, mask, w) -> torch.Tensor:
        """f(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t) (LCM §4.1), x̂0 from the model's ε."""
        denoiser = self.teacher.denoiser
        with guidance(self.unwrap(model), w):
            eps = denoiser.eps(x_t, t, embeds, mask, transformer=model).float()
        x0 = x0_from_eps(x_t.float(), eps, t, denoiser.alphas_cumprod)
        c_skip, c_out = (c.view(-1, *[1] * (x_t.ndim - 1)) for c in lcm_boundary_scalings(t, self.timestep_scaling))
        return c_skip * x_t.float() + c_out * x0

    def teacher_eps(self, x_t, t, embeds, mask, w) -> torch.Tensor:
        """Guided teacher ε_w = ε_c + w·(ε_c − ε_u) per sample (LCM §4.2; = CFG scale w + 1)."""
        x_t, denoiser = x_t.to(self.teacher.dtype), self.teacher.denoiser
        if not self.w_embedding and self.guidance_w == 0:  # decided by the config, not by the data (planner)
            return denoiser.eps(x_t, t, embeds, mask)
        null_embeds, null_mask = self.teacher.null_embedding(x_t.shape[0], embeds.shape[1])
        both = denoiser.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null_embeds, embeds]),
                                torch.cat([null_mask, mask]))
        eps_uncond, eps_cond = both.float().chunk(2)
        return eps_cond + w.view(-1, 1, 1, 1) * (eps_cond - eps_uncond)

    def clean_latents(self, batch: dict) -> torch.Tensor:
        """x0 for q(x_{t_{n+k}} | x0): the teacher pairs' `latents` if the batch has them, else teacher
        samples made once per prompt and cached (methods/teacher_samples.py)."""
        return self.samples.latents(batch)

    # ---- inference and export -----------------------------------------------------------------
    def scheduler(self) -> LCMScheduler:
        return lcm_scheduler(self.teacher.scheduler.config, self.num_ddim_timesteps, self.timestep_scaling)

    def sampling_network(self):
        """The network that is exported: the EMA target (PixArt-δ, like DMD, ships the EMA weights)."""
        return self.target

    @torch.no_grad()
    def sample(self, embeds, mask, noise, num_inference_steps: int | None = None, generator=None) -> torch.Tensor:
        """LCMScheduler multistep sampling without CFG, exactly as the exported pipeline samples.

        Multistep LCM re-noises between steps: pass the `generator` that drew `noise` to match a pipeline
        (without one, a fixed seed keeps training previews comparable)."""
        model = self.sampling_network()
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        w = torch.full((noise.shape[0],), float(self.export_w), device=noise.device)
        denoiser = self.teacher.denoiser

        def eps_fn(x, t):
            with guidance(self.unwrap(model), w):
                return denoiser.eps(x, t, embeds, mask, transformer=model)

        return sample_latents(eps_fn, self.scheduler(), noise, num_inference_steps or self.num_inference_steps,
                              generator=generator)

    def card(self) -> dict:
        card = {"method": self.method_name, "num_inference_steps": self.num_inference_steps, "guidance_scale": 1.0,
                "scheduler": "LCMScheduler", "original_inference_steps": self.num_ddim_timesteps,
                "timestep_scaling": self.timestep_scaling, "guidance_w": self.guidance_w,
                "eval_steps": [1, 2, 4]}  # the rows of the PixArt-Σ paper's supplement, Table 1
        if self.w_embedding:
            card.update(w_embedding=True, w_range=list(self.w_range), baked_w=self.export_w)
        return card

    def export_transformer(self):
        model = self.sampling_network()
        return bake_guidance(model, self.teacher.transformer, self.export_w) if self.w_embedding else model

    def export(self, out_dir: Path) -> Path:
        return export_pipeline(self.teacher, self.export_transformer(), self.scheduler(), out_dir, self.card(),
                               self.full_pipeline_export)
