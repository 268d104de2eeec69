"""rCM: sCM with DMD's distribution matching as a reverse-divergence regulariser.

Zheng et al. 2025, "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency" (arXiv
2510.08431); the facts below were read in its released code (NVlabs/rcm), not copied.

- The student, its sCM loss and its export are methods/scm.py's.
- After the tangent warm-up (step ≥ `tangent_warmup_steps`, the loop's step number) the student's loss adds
  `dmd_weight` × DMD's term on the student's own samples: G is the student's x̂0 at a step of its few-step chain over
  `dmd_timesteps` (backward simulation, methods/backward_simulation.py: each sample stops at a random step, the
  chain before it runs without gradients, the gradient flows through the last step; rCM draws 1–4 steps with random
  times, or fixed ones); then DMD's gradient ∇ = (x̂0_fake − x̂0_real) / mean|G − x̂0_real| at t ~ U[dm_t_min,
  dm_t_max], x̂0_real from the teacher with CFG, and the loss ‖G − sg(G − ∇)‖² (methods/dmd.py: dm_gradient and
  dm_loss, through its DistributionMatching, the very code DMD runs).
- Both terms are per-sample sums, L = ‖F_θ − sg(F_θ) − g‖² + λ·‖G − sg(G − ∇)‖², as rCM sums both; its Wan recipe
  weighs them 100 : 1 (λ = 0.01 here).
- The fake score (a copy of the teacher, or LoRA on it) learns the student's samples with DMD's ε-MSE,
  `fake_updates_per_step` updates per step, from the first step, so that at the switch it already models the
  student (and the loop's check that every trained network moves holds). rCM fits it with an x0 error weighted
  1/sin² t̂; for an ε-parametrised fake score that is the ε error weighted 1/cos² t̂: the same minimiser, another
  weighting over noise levels.
- rCM's own warm-up form scales only the x_t̂ part of the tangent term by r and uses √(1 − r² sin² t̂) for cos t̂ in
  the first; at r = 1 it is Alg. 1's, which methods/scm.py implements.
"""

from __future__ import annotations

from functools import partial

import torch

from ..draws import StepDraws, step_draws
from ..errors import UserError
from .backward_simulation import BackwardSimulation
from .common import TrainableParameters, accumulated_step, micro_slices, trained_parameters
from .dmd import DistributionMatching, fake_score_network
from .scm import SCM, _log


class RCM(SCM):
    """Every setting is required: conf/distill/rcm.yaml (over scm.yaml) is the one home of the defaults."""

    MEMORY_SAVERS = {**SCM.MEMORY_SAVERS,
                     "a LoRA fake score (rank 64) on the frozen teacher": {"distill.fake_score.lora_rank": 64}}

    @staticmethod
    def plan_stand_in(node):
        """Past the warm-up (the DMD term on), and the chain's first step only: a few-step chain branches on its
        draws (which step a sample stops at), which fake tensors do not have."""
        node = SCM.plan_stand_in(node)
        node.dmd_timesteps = list(node.dmd_timesteps)[:1]
        return node

    @staticmethod
    def plan_note(node) -> str:
        return (SCM.plan_note(node) + f"; the student's {len(node.dmd_timesteps)}-step chain for the DMD term is "
                f"planned as its first step (the rest runs without gradients, below the step's peak)")

    def __init__(self, teacher, *, dmd_weight: float, dmd_timesteps, real_guidance_scale: float,
                 fake_updates_per_step: int, dm_t_min: int, dm_t_max: int, fake_optimizer, fake_score,
                 lora_target_modules, **scm_settings):
        super().__init__(teacher, **scm_settings)
        if isinstance(fake_updates_per_step, bool) or not isinstance(fake_updates_per_step, int) \
                or fake_updates_per_step < 1:
            raise UserError(f"distill.fake_updates_per_step={fake_updates_per_step!r}; use an integer >= 1")
        if not (isinstance(dmd_weight, (int, float)) and dmd_weight >= 0):  # a negative λ reverses the DMD term
            raise UserError(f"distill.dmd_weight={dmd_weight!r}; use a number >= 0 (rCM: 0.01; 0 is sCM alone)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in (dm_t_min, dm_t_max)) \
                or not 0 <= dm_t_min < dm_t_max <= 999:
            raise UserError(f"distill.dm_t_min/dm_t_max = {dm_t_min}/{dm_t_max}; need integers 0 <= min < max <= 999")
        self.dmd_weight = dmd_weight
        # where the DMD term's samples G come from: the student's own few-step chain
        self.chain = BackwardSimulation(dmd_timesteps, "distill.dmd_timesteps")
        self.real_guidance_scale = real_guidance_scale
        self.fake_updates_per_step = fake_updates_per_step
        self.dm_t_range = (dm_t_min, dm_t_max)
        self.fake_score, self.fake_lora_rank = fake_score_network(
            teacher, fake_score, lora_target_modules, scm_settings["gradient_checkpointing"])
        self.matching = DistributionMatching(teacher, self.fake_score, real_guidance_scale)
        self.models["fake_score"] = self.fake_score
        self.optimizers["fake_score"] = fake_optimizer([p for _, p in trained_parameters(self.fake_score)])

    # ---- loop interface ---------------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        fake_score = self.unwrap(self.fake_score)
        return {**super().checkpoint_modules(),
                "fake_score": TrainableParameters(fake_score) if self.fake_lora_rank else fake_score}

    def prepare(self, accelerator) -> None:
        super().prepare(accelerator)
        self.matching.fake_score = self.fake_score  # as prepared (DDP's gradient sync goes through the wrapper)

    def train_step(self, batch: dict, gen: torch.Generator | StepDraws, micro_batches: int = 1) -> dict:
        """One student update (sCM, plus the DMD term after the warm-up), then `fake_updates_per_step` fake-score
        updates on the student's samples."""
        gen = step_draws(gen)
        draws = self.draw(batch, gen)
        parts = micro_slices(len(batch["prompt"]), micro_batches)
        logs = self.student_update(batch, draws, parts)
        embeds, mask = batch["embeds"], batch["mask"]

        def fake_loss(update: int, rows: slice):
            fresh, t, noise = draws["fake"][update]
            x0 = draws["samples"].get(rows.start)
            if fresh is not None:
                with torch.no_grad():
                    x_in, t_in = self.chain.input(self, fresh, rows, embeds[rows], mask[rows])
                    x0 = self.generate(self.student, embeds[rows], mask[rows], x_in, t_in)
            return self.matching.fake_score_loss(x0, embeds[rows], mask[rows], t[rows], noise[rows]) / len(parts)

        for update in range(self.fake_updates_per_step):
            logs["loss_fake"], logs["grad_norm_fake"] = accumulated_step(
                self.accelerator, self.fake_score, self.optimizers["fake_score"],
                [partial(fake_loss, update, rows) for rows in parts], self.grad_clip)
        return logs

    # ---- the method -------------------------------------------------------------------------
    @property
    def generator(self) -> torch.nn.Module:
        """The network backward simulation runs (methods/backward_simulation.py): the student."""
        return self.student

    def draw_noise(self, batch_size: int, gen: StepDraws) -> torch.Tensor:
        return self.matching.draw_noise(batch_size, gen)

    def draw(self, batch: dict, gen: StepDraws) -> dict:
        """sCM's draws, then the DMD term's (the chain's inputs, its noise level and noise) once it is on, then
        each fake-score update's (fresh student samples, except the first update after the DMD term, which reuses
        the samples it made)."""
        draws = super().draw(batch, gen)
        b, matching = len(batch["prompt"]), self.matching
        draws["dmd"] = gen.step >= self.warmup
        if draws["dmd"]:
            draws.update(inputs=self.chain.draw(self, b, gen), t_dm=matching.draw_timesteps(b, *self.dm_t_range, gen),
                         noise_dm=matching.draw_noise(b, gen))
        draws["fake"] = [(None if i == 0 and draws["dmd"] else self.chain.draw(self, b, gen),
                          matching.draw_timesteps(b, *matching.fake_t_range, gen), matching.draw_noise(b, gen))
                         for i in range(self.fake_updates_per_step)]
        draws["samples"] = {}  # micro-batch → the student's samples G of the DMD term (the first fake update's)
        return draws

    def student_loss(self, batch, draws: dict, rows: slice, logs: dict, parts: int) -> torch.Tensor:
        """The rows' share of the batch's mean per-sample loss: sCM's, plus λ times DMD's after the warm-up."""
        total = self.consistency_loss(batch, draws, rows, logs, parts).sum()
        if draws["dmd"]:
            embeds, mask = batch["embeds"][rows], batch["mask"][rows]
            x_in, t_in = self.chain.input(self, draws["inputs"], rows, embeds, mask)
            G = self.generate(self.student, embeds, mask, x_in, t_in)
            draws["samples"][rows.start] = G.detach()
            # dm_loss is 0.5·mean over elements: × 2·numel is the sum over the rows of ‖G − sg(G − ∇)‖²
            dm = self.matching.distribution_matching_loss(G, embeds, mask, draws["t_dm"][rows], draws["noise_dm"][rows])
            dm_sum = dm * 2 * G.numel()
            _log(logs, "loss_dm", dm_sum / G.shape[0], parts)
            total = total + self.dmd_weight * dm_sum
        return total / len(batch["prompt"])

    def card(self) -> dict:
        return {**super().card(), "dmd_weight": self.dmd_weight, "dmd_timesteps": list(self.chain.timesteps),
                "real_guidance_scale": self.real_guidance_scale, "fake_updates_per_step": self.fake_updates_per_step}
