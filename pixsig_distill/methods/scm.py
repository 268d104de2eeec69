"""sCM: continuous-time consistency distillation into a few-step student F_θ(x_t̂, t̂, text).

Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (arXiv 2410.11081):
TrigFlow (§2), and consistency distillation in continuous time (§4, Algorithm 1: the proposal of t̂, the JVP
rearrangement, tangent normalisation, tangent warm-up). Equation numbers are not cited here: only the algorithm's
lines and the sections were checked.

- PixArt-Σ is TrigFlow with σ_d = 1 (denoiser.py): x_t̂ = cos t̂·x0 + sin t̂·z is the DDPM x_t at t̂ = arccos √ᾱ_t, and
  a network's TrigFlow output F is its v-prediction.
- The student outputs F_θ itself: a v-prediction transformer initialised from the teacher's weights (at first it
  still outputs ε̂; the start of the tangent warm-up, r = 0, is velocity regression to the teacher and converts it).
  Its consistency function is f_θ(x, t̂) = cos t̂·x − sin t̂·F_θ(x, t̂) (§2), so f(x, 0) = x by construction. An ε
  student converted to F through 1/cos t̂ would have a tangent growing as 1/cos² t̂ (docs/consistency.md).
- The ODE: dx/dt̂ = F_teacher(x, t̂), the teacher's TrigFlow output with classifier-free guidance at one fixed scale
  (guidance distilled as LCM distils it; the student samples without CFG).
- Per sample (Alg. 1): τ ~ N(P_mean, P_std²), tan t̂ = e^τ/σ_d (kept inside the teacher's trained range);
  x_t̂ = cos t̂·x0 + sin t̂·z, x0 a teacher sample of the prompt (methods/teacher_samples.py);
  g = −cos² t̂·(F_θ⁻ − dx/dt̂) − r·(cos t̂ sin t̂·x_t̂ + cos t̂ sin t̂·dF_θ⁻/dt̂), where cos t̂ sin t̂·dF_θ⁻/dt̂ is ONE
  Jacobian-vector product of F_θ⁻ in (x_t̂, t̂) along (cos t̂ sin t̂·dx/dt̂, cos t̂ sin t̂) (jvp.py: forward-mode AD on
  the math attention path, or a finite difference); g = cos t̂·df⁻/dt̂ at r = 1, the change of the consistency
  function along the ODE, which training drives to zero;
  r = min(1, step / warm-up) (tangent warm-up, from the loop's step number: a resume continues it);
  g ← g / (‖g‖ + c) per sample (tangent normalisation, c = 0.1);
  loss ‖F_θ − F_θ⁻ − g‖² with F_θ⁻ = sg(F_θ): its value is ‖g‖², its gradient moves F_θ along g.
- Adaptive weighting (§4, a learned w(t̂)) is left out: tangent normalisation already bounds each sample's target,
  rCM's released code trains without it, and it would be a third trained network to checkpoint, shard and plan.
- θ⁻ is the student itself under stop-gradient (sCM has no EMA target); an optional EMA is what is exported.
- Export: a stock `PixArtSigmaPipeline` with `LCMScheduler(prediction_type="v_prediction")`: its step takes
  x̂0 = √ᾱ·x − √(1−ᾱ)·v = f_θ(x, t̂) and re-noises it to the next timestep with fresh noise, sCM's multistep sampler.
  diffusers' SCMScheduler does not run in PixArtSigmaPipeline and reads TrigFlow times that PixArt's embedding would
  take for DDPM timesteps near 0 (docs/consistency.md).
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import torch
from diffusers import LCMScheduler

from ..denoiser import x0_from_trigflow
from ..distributed import full_parameters
from ..draws import StepDraws, step_draws
from ..errors import UserError
from ..jvp import ExactJVP, FiniteDifferenceJVP
from ..sampling import sample_latents
from ..schedule import scheduler_like
from .backward_simulation import TIMESTEP_SCALING
from .base import Method
from .common import EMA, accumulated_step, export_network, micro_slices, trainable_copy
from .teacher_samples import TeacherSamples

JVP_MODES = ("exact", "finite_difference")


def consistency_target(F_minus, velocity, x_t, tangent, t_hat, r: float, c: float) -> torch.Tensor:
    """The target direction g of Alg. 1 per sample, normalised, and its norm before: F_minus = F_θ⁻(x_t̂, t̂),
    velocity = dx/dt̂, tangent = cos t̂ sin t̂·dF_θ⁻/dt̂ (the rearranged JVP)."""
    shape = (-1, *[1] * (x_t.ndim - 1))
    cos, sin = t_hat.cos().view(shape), t_hat.sin().view(shape)
    g = -cos**2 * (F_minus - velocity) - r * (cos * sin * x_t + tangent)
    norm = g.flatten(1).norm(dim=1).view(shape)
    return g / (norm + c), norm  # tangent normalisation: g / (‖g‖ + c)


def consistency_loss(F: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖F_θ − F_θ⁻ − g‖² per sample, F_θ⁻ = sg(F_θ): the gradient −2g moves F_θ along g (Alg. 1)."""
    return (F - (F + g).detach()).flatten(1).pow(2).sum(dim=1)


def jvp_from_config(mode: str, step: float, scheme: str):
    if mode not in JVP_MODES:
        raise UserError(f"distill.jvp={mode!r}; use exact (forward-mode AD, math attention) or finite_difference "
                        f"(distill.jvp_step, distill.jvp_scheme)")
    return ExactJVP() if mode == "exact" else FiniteDifferenceJVP(step, scheme)


class SCM(Method):
    """Every setting is required: conf/distill/scm.yaml is the one home of the defaults, with what each means."""

    MEMORY_SAVERS = {  # what `plan.fit` may turn on, cheapest first
        "the student EMA on the CPU": {"distill.ema_device": "cpu"},
        "8-bit AdamW (bitsandbytes, CUDA)": {"distill.optimizer._target_": "pixsig_distill.optim.adamw_8bit"}}

    @staticmethod
    def plan_stand_in(node):
        """A plan simulates a step past the warm-up (the planner's step is step 0): the tangent's full weight, and
        rCM's distribution-matching term, which starts there."""
        node.tangent_warmup_steps = 0
        return node

    @staticmethod
    def plan_note(node) -> str:
        path = ("forward-mode AD on diffusers' math attention (AttnProcessor: the B·heads·N² score matrix and a "
                "tangent beside every live activation are in the simulated step)" if node.get("jvp") == "exact" else
                "a finite difference: two more no-grad forwards, no tangent memory")
        return f"the JVP assumes {path}; the training forward and backward keep the model's own attention kernel"

    def __init__(self, teacher, *, guidance_scale: float, proposal_mean: float, proposal_std: float,
                 tangent_warmup_steps: int, tangent_norm_c: float, jvp: str, jvp_step: float, jvp_scheme: str,
                 optimizer, grad_clip: float | None, ema_decay: float | None, ema_device: str,
                 num_inference_steps: int, pair_steps: int | None, pair_guidance_scale: float | None,
                 pair_cache_size: int, seed: int, gradient_checkpointing: bool, full_pipeline_export: bool,
                 name: str = "scm"):
        if isinstance(tangent_warmup_steps, bool) or not isinstance(tangent_warmup_steps, int) \
                or tangent_warmup_steps < 0:
            raise UserError(f"distill.tangent_warmup_steps={tangent_warmup_steps!r}; use an integer >= 0 (sCM: "
                            f"10,000 iterations; 0: the full tangent from the first step)")
        if not proposal_std > 0 or not tangent_norm_c > 0:
            raise UserError(f"distill.proposal_std={proposal_std}, tangent_norm_c={tangent_norm_c}; both must be "
                            f"positive (sCM: 1.6 and 0.1)")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise UserError(f"distill.ema_decay={ema_decay}; use a number in [0, 1), or null for no EMA")
        if ema_device not in ("same", "cpu"):
            raise UserError(f"distill.ema_device={ema_device!r}; use same (the student's device) or cpu")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or not 1 <= num_inference_steps <= 1000:
            raise UserError(f"distill.num_inference_steps={num_inference_steps!r}; use an integer in 1..1000")
        self.teacher, self.name = teacher, name
        self.guidance_scale = guidance_scale
        self.proposal = (proposal_mean, proposal_std)
        self.warmup, self.c = tangent_warmup_steps, tangent_norm_c
        self.jvp_mode, self.jvp = jvp, jvp_from_config(jvp, jvp_step, jvp_scheme)
        self.grad_clip = grad_clip
        self.num_inference_steps = num_inference_steps
        self.samples = TeacherSamples(teacher, pair_steps, pair_guidance_scale, pair_cache_size, seed)
        self.full_pipeline_export = full_pipeline_export
        self.accelerator = None

        self.student = trainable_copy(teacher.transformer, gradient_checkpointing)
        self.jvp.check(self.student)  # an attention that neither has forward-mode AD nor swaps: one line, now
        self.student_ema = None if ema_decay is None else EMA(self.student, ema_decay,
                                                              "cpu" if ema_device == "cpu" else None)
        self.models = {"student": self.student}
        self.optimizers = {"student": optimizer([p for p in self.student.parameters() if p.requires_grad])}

    # ---- loop interface ---------------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"student": self.unwrap(self.student)}
        if self.student_ema is not None:
            modules["student_ema"] = self.student_ema
        return modules

    def check_engine(self, engine: str) -> None:
        if engine == "zero3" and self.jvp_mode == "exact":
            raise UserError("distill.jvp=exact under DeepSpeed ZeRO-3: its parameter hooks have no forward-mode AD; "
                            "use distill.jvp=finite_difference, or launch with deepspeed_zero2.yaml or "
                            "fsdp2_full_shard.yaml (docs/consistency.md)")

    def prepare(self, accelerator) -> None:
        self.prepare_networks(accelerator, self.grad_clip)  # asks check_engine first

    def train_step(self, batch: dict, gen: torch.Generator | StepDraws, micro_batches: int = 1) -> dict:
        """One student update from the batch, split into `micro_batches` (gradient accumulation)."""
        gen = step_draws(gen)
        draws = self.draw(batch, gen)
        return self.student_update(batch, draws, micro_slices(len(batch["prompt"]), micro_batches))

    def student_update(self, batch: dict, draws: dict, parts: list[slice]) -> dict:
        logs = {"r": torch.tensor(draws["r"])}
        _, logs["grad_norm"] = accumulated_step(
            self.accelerator, self.student, self.optimizers["student"],
            [partial(self.student_loss, batch, draws, rows, logs, len(parts)) for rows in parts], self.grad_clip)
        if self.student_ema is not None:
            with full_parameters(self.accelerator, self.student) as student:  # gathered if sharded
                self.student_ema.update(student)
        return logs

    # ---- the method -------------------------------------------------------------------------
    def draw(self, batch: dict, gen: StepDraws) -> dict:
        """The step's random numbers for the whole batch (micro-batches slice them): x0 is the prompts' teacher
        samples, z the noise, t̂ the proposal's; r the tangent warm-up's weight at this step."""
        x0 = self.samples.latents(batch)
        b, device = x0.shape[0], x0.device
        low, high = self.teacher.denoiser.trained_trigflow_range()
        mean, std = self.proposal
        tau = mean + std * gen.randn((b,))
        t_hat = torch.arctan(tau.exp()).to(device).clamp(low, high)  # tan t̂ = e^τ / σ_d, σ_d = 1 (Alg. 1)
        r = min(1.0, gen.step / self.warmup) if self.warmup else 1.0
        return {"x0": x0, "z": gen.randn(x0.shape).to(device), "t_hat": t_hat, "r": r}

    def student_loss(self, batch, draws: dict, rows: slice, logs: dict, parts: int) -> torch.Tensor:
        """The micro-batch `rows`' share of the batch's sCM loss (what it adds to the batch mean)."""
        loss = self.consistency_loss(batch, draws, rows, logs, parts)
        return loss.sum() / len(batch["prompt"])

    def consistency_loss(self, batch, draws: dict, rows: slice, logs: dict, parts: int) -> torch.Tensor:
        """Alg. 1 for the rows: the per-sample sCM loss ‖F_θ − sg(F_θ) − g‖² (its value is ‖g‖² ≤ 1)."""
        embeds, mask = batch["embeds"][rows], batch["mask"][rows]
        t_hat = draws["t_hat"][rows]
        shape = (-1, *[1] * (draws["x0"].ndim - 1))
        x_t = t_hat.cos().view(shape) * draws["x0"][rows] + t_hat.sin().view(shape) * draws["z"][rows]
        denoiser = self.teacher.denoiser
        with torch.no_grad():
            velocity = denoiser.trigflow(x_t, t_hat, embeds, mask, self.guidance_scale)  # dx/dt̂: the guided teacher
            tangent = self.tangent(x_t, t_hat, velocity, embeds, mask)
        F = denoiser.output(x_t, denoiser.ddpm_time(t_hat), embeds, mask, transformer=self.student).float()
        with torch.no_grad():  # F_θ⁻ = sg(F_θ): the same forward's value
            g, g_norm = consistency_target(F.detach(), velocity, x_t, tangent, t_hat, draws["r"], self.c)
        _log(logs, "g_norm", g_norm.mean(), parts)
        loss = consistency_loss(F, g)
        _log(logs, "loss_scm", loss.mean(), parts)
        return loss

    def tangent(self, x_t, t_hat, velocity, embeds, mask) -> torch.Tensor:
        """cos t̂ sin t̂·dF_θ⁻/dt̂ along the ODE: one JVP of the student in (x_t̂, t̂) along (cos t̂ sin t̂·dx/dt̂,
        cos t̂ sin t̂) (Alg. 1's rearrangement), without a graph (the target is stop-gradient)."""
        student = self.unwrap(self.student)
        fn = self.teacher.denoiser.in_trigflow_time(embeds, mask, transformer=student)
        weight = t_hat.cos() * t_hat.sin()
        tangents = (weight.view(-1, *[1] * (x_t.ndim - 1)) * velocity, weight)
        # A finite difference needs float32: under bf16 autocast its rounding swamps the step (jvp.py).
        precise = (torch.autocast(x_t.device.type, enabled=False) if isinstance(self.jvp, FiniteDifferenceJVP)
                   else contextlib.nullcontext())
        with precise:
            return self.jvp(fn, (x_t, t_hat), tangents, networks=[student]).float()

    def generate(self, generator, embeds, mask, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """One student step from x at integer timestep t (the noisiest by default): x̂0 = f_θ(x, t̂(t))
        (what backward simulation and the exported LCMScheduler compute)."""
        denoiser = self.teacher.denoiser
        if t is None:
            t = torch.full((x.shape[0],), denoiser.num_train_timesteps - 1, device=x.device, dtype=torch.long)
        F = denoiser.output(x, t, embeds, mask, transformer=generator).float()
        return x0_from_trigflow(x.float(), F, denoiser.trigflow_time(t))

    # ---- inference and export -----------------------------------------------------------------
    def scheduler(self):
        """LCMScheduler reading the output as v (= F): x̂0 at each timestep, re-noised with fresh noise to the next
        (`timestep_scaling` makes its boundary blend x̂0 itself; every timestep is on its 1000-step grid)."""
        return scheduler_like(LCMScheduler, self.teacher.scheduler.config, prediction_type="v_prediction",
                              timestep_scaling=TIMESTEP_SCALING, original_inference_steps=1000, clip_sample=False,
                              thresholding=False)

    def sampling_network(self):
        """The student the export holds: its EMA weights when it has an EMA (a context manager)."""
        return self.ema_or_self(self.unwrap(self.student), self.student_ema)

    @torch.no_grad()
    def sample(self, embeds, mask, noise, num_inference_steps: int | None = None, generator=None) -> torch.Tensor:
        """The exported pipeline's sampler, without CFG. It re-noises between steps: pass the `generator` that drew
        `noise` to match a pipeline (without one, a fixed seed keeps training previews comparable)."""
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        with self.sampling_network() as student:
            denoiser = self.teacher.denoiser

            def v_fn(x, t):
                return denoiser.output(x, t, embeds, mask, transformer=student)

            return sample_latents(v_fn, self.scheduler(), noise, num_inference_steps or self.num_inference_steps,
                                  generator=generator)

    def card(self) -> dict:
        return {"method": self.name, "num_inference_steps": self.num_inference_steps, "guidance_scale": 1.0,
                "scheduler": "LCMScheduler", "prediction_type": "v_prediction", "original_inference_steps": 1000,
                "timestep_scaling": TIMESTEP_SCALING, "eval_steps": [1, 2, 4],
                "distilled_guidance_scale": self.guidance_scale, "jvp": self.jvp_mode,
                "tangent_warmup_steps": self.warmup, "proposal": list(self.proposal)}

    def export(self, out_dir: Path) -> Path:
        with torch.no_grad(), self.sampling_network() as student:
            return export_network(self.teacher, student, self.scheduler(), out_dir, self.card(),
                                  self.full_pipeline_export)


def _log(logs: dict, name: str, value: torch.Tensor, parts: int) -> None:
    """A figure of the whole batch from its micro-batches: the mean of their means."""
    logs[name] = logs.get(name, 0.0) + value.detach() / parts
