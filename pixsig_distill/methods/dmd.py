"""DMD: distribution matching distillation into a one- or few-step generator G(z, T̄, text).

Follows the PixArt-Σ DMD recipe (DMD1 + regression; Yin et al. 2024, "One-step Diffusion with
Distribution Matching Distillation"), with DMD2's pieces as parts it takes ("Improved Distribution Matching
Distillation for Fast Image Synthesis"):
- generator G, initialised from the teacher; its input is pure noise labelled T̄, or its own chain over a few
  timesteps (backward simulation, methods/backward_simulation.py);
- real score: the frozen teacher with classifier-free guidance;
- fake score: a trainable copy of the teacher fitted (ε-MSE) to G's current samples, several updates per generator
  update (DMD2's two time-scale rule, §4.1);
- the distribution-matching gradient ∇ = x̂0_fake − x̂0_real, normalised per sample;
- extra loss terms, each a plain object (methods/terms.py): the regression loss on teacher pairs (DMD eq. 9),
  DMD2's GAN (methods/gan.py), rewards.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..draws import StepDraws, step_draws
from ..distributed import full_parameters
from ..errors import UserError
from ..sampling import sample_latents
from ..schedule import add_noise
from .backward_simulation import BackwardSimulation, check_timesteps
from .base import Method
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


class DistributionMatching:
    """DMD's distribution matching for a generator's samples x̂0: the real score (the frozen teacher, guided at
    `real_guidance_scale`), a fake score fitted to the generator's samples, and the DM loss between the two (DMD
    eq. 7–8). DMD is one (methods/dmd.py: its generator one- or few-step); rCM holds one for its consistency student
    (methods/rcm.py)."""

    fake_t_range = (0, 999)  # the fake score's ε-MSE timesteps: every noise level

    def __init__(self, teacher, fake_score: torch.nn.Module, real_guidance_scale: float):
        self.teacher, self.fake_score, self.real_guidance_scale = teacher, fake_score, real_guidance_scale

    def draw_noise(self, batch_size: int, gen: StepDraws) -> torch.Tensor:
        return gen.randn(self.teacher.latent_shape(batch_size)).to(self.teacher.device)

    def draw_timesteps(self, batch_size: int, low: int, high: int, gen: StepDraws) -> torch.Tensor:
        return gen.randint(low, high + 1, batch_size).to(self.teacher.device)

    def distribution_matching_loss(self, x0_hat, embeds, mask, t, noise) -> torch.Tensor:
        """DMD eq. 7–8: ∇_x̂0 KL ≈ (x̂0_fake − x̂0_real) / mean|x̂0 − x̂0_real| at the noise level t."""
        with torch.no_grad():
            x_t = add_noise(x0_hat.detach(), noise, t, self.teacher.denoiser.alphas_cumprod)
            x0_real = self.real_x0(x_t, t, embeds, mask)
            x0_fake = self.fake_x0(x_t, t, embeds, mask)
            grad = dm_gradient(x0_hat.detach(), x0_real, x0_fake)
        return dm_loss(x0_hat, grad)

    def real_x0(self, x_t, t, embeds, mask) -> torch.Tensor:
        """The frozen teacher's (guided) x̂0: the real score."""
        return self.teacher.denoiser.x0(x_t, t, embeds, mask, guidance_scale=self.real_guidance_scale)

    def fake_x0(self, x_t, t, embeds, mask) -> torch.Tensor:
        return self.teacher.denoiser.x0(x_t, t, embeds, mask, transformer=self.fake_score)

    def fake_score_loss(self, samples, embeds, mask, t, noise) -> torch.Tensor:
        """Denoising score matching on the generator's (detached) samples: plain ε-MSE, conditional only."""
        denoiser = self.teacher.denoiser
        x_t = add_noise(samples, noise, t, denoiser.alphas_cumprod)
        eps = denoiser.eps(x_t.to(self.teacher.dtype), t, embeds, mask, transformer=self.fake_score).float()
        return F.mse_loss(eps, noise)


def fake_score_network(teacher, spec, target_modules, gradient_checkpointing: bool) -> tuple[torch.nn.Module, int]:
    """The fake score and its LoRA rank: a trainable float32 copy of the teacher (`lora_rank: 0`), or LoRA adapters
    on a copy that shares the frozen teacher's weights (the real score is then the same base without adapters, so a
    method holds one frozen base instead of a second trained network; the teacher itself stays as it was)."""
    rank, alpha = _lora_spec(spec, "fake_score")
    if rank:
        return lora_network(weight_sharing_copy(teacher.transformer), rank, alpha, list(target_modules),
                            gradient_checkpointing), rank
    return trainable_copy(teacher.transformer, gradient_checkpointing), 0


class DMD(DistributionMatching, Method):
    """Every setting is required: conf/distill/dmd.yaml is the one home of the defaults, with what each means.
    The fake score, the real score and the DM loss are `DistributionMatching`'s (its attributes are set here)."""
    # What `plan.fit` may turn on when a step does not fit, cheapest first (config overrides).
    MEMORY_SAVERS = {
        "the generator EMA on the CPU": {"distill.ema_device": "cpu"},
        "8-bit AdamW (bitsandbytes, CUDA)": {"distill.generator_optimizer._target_": "pixsig_distill.optim.adamw_8bit",
                                             "distill.fake_optimizer._target_": "pixsig_distill.optim.adamw_8bit"},
        "a LoRA fake score (rank 64) on the frozen teacher": {"distill.fake_score.lora_rank": 64},
        "a LoRA generator (rank 64)": {"distill.generator.lora_rank": 64},
    }

    @staticmethod
    def plan_stand_in(node):
        """A few-step chain branches on its draws (which step a sample stops at): a plan runs its first step, the
        one-step generator's memory (a schedule training refuses is refused here too)."""
        if len(node.get("timesteps") or []) > 1:
            node.timesteps = check_timesteps(node.timesteps)[:1]
        return node

    @staticmethod
    def plan_note(node) -> str | None:
        chain = len(node.get("timesteps") or [])
        if chain > 1:
            return (f"the {chain}-step generator's chain (backward simulation) is not simulated: it runs without "
                    f"gradients (below the step's memory peak) and adds to the FLOPs {(chain - 1) / 2:g} generator "
                    f"forwards per sample on average for each draw of generator inputs (the generator's update, every "
                    f"fake-score update after the first)")
        return None

    def __init__(self, teacher, *, timesteps, real_guidance_scale: float, fake_updates_per_step: int, dm_t_min: int,
                 dm_t_max: int, dm_start_step: int, generator_optimizer, fake_optimizer, grad_clip: float | None,
                 ema_decay: float | None, ema_device: str, generator, fake_score, lora_target_modules, gradient_checkpointing: bool,
                 full_pipeline_export: bool, regression=None, gan=None, rewards=None, name: str = "dmd"):
        if isinstance(fake_updates_per_step, bool) or not isinstance(fake_updates_per_step, int) \
                or fake_updates_per_step < 1:
            raise UserError(f"distill.fake_updates_per_step={fake_updates_per_step!r}; use an integer >= 1")
        if isinstance(dm_start_step, bool) or not isinstance(dm_start_step, int) or dm_start_step < 0:
            raise UserError(f"distill.dm_start_step={dm_start_step!r}; use an integer >= 0 (0: the DM loss from the "
                            f"first step)")
        if dm_start_step and not (regression or gan or rewards):
            raise UserError(f"distill.dm_start_step={dm_start_step}: before it the generator learns only from its "
                            f"extra terms, and this run has none; add one (e.g. +distill/regression=pairs) or set "
                            f"distill.dm_start_step=0")
        if not 0 <= dm_t_min < dm_t_max <= 999:
            raise UserError(f"distill.dm_t_min/dm_t_max = {dm_t_min}/{dm_t_max}; need 0 <= min < max <= 999")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise UserError(f"distill.ema_decay={ema_decay}; use a number in [0, 1), or null for no EMA")
        if ema_device not in ("same", "cpu"):
            raise UserError(f"distill.ema_device={ema_device!r}; use same (the generator's device) or cpu")
        self.teacher = teacher
        self.name = name
        self.chain = BackwardSimulation(timesteps)  # the generator's input: noise at T̄, or its own few-step chain
        self.t_bar = self.chain.timesteps[0]
        self.real_guidance_scale = real_guidance_scale
        self.fake_updates_per_step = fake_updates_per_step
        self.dm_t_range = (dm_t_min, dm_t_max)
        self.dm_start_step = dm_start_step
        self.grad_clip = grad_clip
        self.ema_decay = ema_decay
        self.full_pipeline_export = full_pipeline_export

        # Memory-lean options (docs/real_scale.md): the generator and the fake score are each a full float32 copy
        # of the teacher or LoRA adapters. A LoRA fake score sits on the frozen teacher's own weights (the real score
        # is the same base without adapters), so DMD then holds one frozen base instead of a second trained network.
        targets = list(lora_target_modules)
        self.generator_lora_rank, gen_alpha = _lora_spec(generator, "generator")
        self.generator = trained_network(teacher.transformer, self.generator_lora_rank, gen_alpha, targets,
                                         gradient_checkpointing)
        self.fake_score, self.fake_lora_rank = fake_score_network(teacher, fake_score, targets, gradient_checkpointing)
        self.generator_ema = (None if ema_decay is None else
                              EMA(self.generator, ema_decay, "cpu" if ema_device == "cpu" else None))
        self.models = {"generator": self.generator, "fake_score": self.fake_score}
        self.optimizers = {"generator": generator_optimizer([p for _, p in trained_parameters(self.generator)]),
                           "fake_score": fake_optimizer([p for _, p in trained_parameters(self.fake_score)])}
        self.accelerator = None
        # Extra loss terms, in a fixed order (their draws come in this order): regression, GAN, rewards by name.
        self.terms = [t for t in (regression, gan) if t is not None] + [rewards[k] for k in sorted(rewards or {})]
        for term in self.terms:
            term.attach(self)

    # ---- loop interface ---------------------------------------------------------------------
    def held_modules(self) -> list[torch.nn.Module]:
        """Frozen networks the step runs besides the teacher and the trained ones (reward models): for the planner."""
        return [module for term in self.terms for module in term.modules()]

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        """Full networks as state dicts of the transformer; LoRA networks as their adapters only."""
        modules = {}
        for name, lora_rank in (("generator", self.generator_lora_rank), ("fake_score", self.fake_lora_rank)):
            network = self.unwrap(self.models[name])
            modules[name] = TrainableParameters(network) if lora_rank else network
        if self.generator_ema is not None:
            modules["generator_ema"] = self.generator_ema
        return modules

    def check_engine(self, engine: str) -> None:
        """What DMD cannot run under `engine` (distributed.engine_name): refused by training and by a plan alike."""
        if engine == "zero3" and any(term.generator_loss_reads_fake_score for term in self.terms):
            raise UserError("distill.gan under DeepSpeed ZeRO-3: the generator's GAN loss back-propagates through the "
                            "fake score, another ZeRO-3 engine, which DeepSpeed does not support; launch DMD2 with "
                            "deepspeed_zero2.yaml or fsdp2_full_shard.yaml, plan it with plan.engine=zero2 or fsdp2 "
                            "(docs/scaling.md)")

    def prepare(self, accelerator) -> None:
        self.prepare_networks(accelerator, self.grad_clip)

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
        inputs = self.chain.draw(self, b, gen)
        t_dm, noise_dm = self.draw_timesteps(b, *self.dm_t_range, gen), self.draw_noise(b, gen)
        term_draws = [term.draw(self, batch, gen) for term in self.terms]
        fake_draws = [(self.chain.draw(self, b, gen) if i > 0 else None, self.draw_timesteps(b, *self.fake_t_range, gen),
                       self.draw_noise(b, gen)) for i in range(self.fake_updates_per_step)]
        parts = micro_slices(b, micro_batches)
        logs = {}

        def log(name: str, value: torch.Tensor) -> None:
            logs[name] = logs.get(name, 0.0) + value.detach() / len(parts)

        # Generator update: the distribution-matching loss and the terms' generator losses.
        samples = [None] * len(parts)

        def generator_loss(i: int, rows: slice):
            x_in, t_in = self.chain.input(self, inputs, rows, embeds[rows], mask[rows])
            x0_hat = self.generate(self.generator, embeds[rows], mask[rows], x_in, t_in)
            samples[i] = x0_hat.detach()
            loss = self.distribution_matching_loss(x0_hat, embeds[rows], mask[rows], t_dm[rows], noise_dm[rows])
            log("loss_dm", loss)
            if gen.step < self.dm_start_step:  # a warm start on the terms alone (e.g. ODE regression); logged only
                loss = loss.detach() * 0
            for term, draws in zip(self.terms, term_draws):
                for name, value, weight in term.generator_losses(self, x0_hat, embeds[rows], mask[rows], draws, rows,
                                                                 (i, len(parts))):
                    log(name, value)
                    loss = loss + weight * value
            return loss / len(parts)

        # The fake score is frozen while the generator learns (the GAN term reads through it): no gradient for it,
        # and, checkpointed, its forward is recomputed in the backward under the requires_grad state it ran with.
        with frozen(self.unwrap(self.fake_score)):
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
                    x_in, t_in = self.chain.input(self, fresh, rows, embeds[rows], mask[rows])
                    x0 = self.generate(self.generator, embeds[rows], mask[rows], x_in, t_in)
            loss = self.fake_score_loss(x0, embeds[rows], mask[rows], t[rows], noise[rows])
            for term, draws in zip(self.terms, term_draws):  # right after the ε-MSE forward (the GAN reads it)
                for name, value, weight in term.fake_score_losses(self, x0, embeds[rows], mask[rows], draws, rows,
                                                                  update):
                    logs[name] = value.detach()
                    loss = loss + weight * value
            return loss / len(parts)

        for update in range(self.fake_updates_per_step):
            logs["loss_fake"], logs["grad_norm_fake"] = accumulated_step(
                acc, self.fake_score, self.optimizers["fake_score"],
                [partial(fake_loss, update, i, rows) for i, rows in enumerate(parts)], self.grad_clip)
        return logs

    # ---- the method -------------------------------------------------------------------------
    def generate(self, generator, embeds, mask, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """One step: x̂0 = (z − √(1−ᾱ_t)·ε_G(z, t)) / √ᾱ_t, by default at t = T̄ with z ~ N(0, I) unscaled (PixArt
        DMD)."""
        if t is None:
            t = torch.full((z.shape[0],), self.t_bar, device=z.device, dtype=torch.long)
        return self.teacher.denoiser.x0(z, t, embeds, mask, transformer=generator)

    # ---- inference and export -----------------------------------------------------------------
    def scheduler(self):
        return self.chain.scheduler(self.teacher.scheduler.config)

    def sampling_network(self):
        """The generator the student is: its EMA weights when it has an EMA (a context manager)."""
        return self.ema_or_self(self.unwrap(self.generator), self.generator_ema)

    @torch.no_grad()
    def sample(self, embeds, mask, noise) -> torch.Tensor:
        """The (EMA) generator's sample, through the same scheduler and timesteps the exported pipeline uses."""
        with self.sampling_network() as generator:
            denoiser = self.teacher.denoiser

            def eps_fn(x, t):
                return denoiser.eps(x, t, embeds, mask, transformer=generator)

            return sample_latents(eps_fn, self.scheduler(), noise, timesteps=self.chain.timesteps)

    def card(self) -> dict:
        """The sampling recipe the export carries (pixsig_student.json), and what the terms add to it."""
        card = {"method": self.name, **self.chain.card()}
        models = {}
        for term in self.terms:
            card.update(term.card())
            models.update(term.objective_models())
        if models:  # what an evaluation must not count as independent evidence (pixsig_distill/identity.py)
            card["objective_models"] = models
        return card

    def export(self, out_dir: Path) -> Path:
        """A stock diffusers pipeline of the (EMA) generator; a LoRA generator is merged into a full transformer
        and its adapter is written beside it in peft format (export/lora)."""
        card = self.card()
        if self.generator_lora_rank:
            card.update(lora="lora", lora_rank=self.generator_lora_rank)
        with torch.no_grad(), self.sampling_network() as generator:
            return export_network(self.teacher, generator, self.scheduler(), out_dir, card, self.full_pipeline_export,
                                  lora=bool(self.generator_lora_rank))
