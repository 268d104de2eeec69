"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"): DMD without the
regression loss, plus

- a GAN (§4.2): a small classifier head on the fake score's features (the hidden states of one transformer
  block, `gan.block`) tells noised real latents from noised generator samples; the head and the fake score's
  trunk learn it with the fake score's update (the generated side read off the fake score's own denoising
  forward), the generator gets the non-saturating term;
- the two time-scale rule (§4.1): several fake-score updates per generator update (`fake_updates_per_step`);
- few-step generation with backward simulation (§4.4): the generator runs over `timesteps` (e.g. [999, 749, 499,
  249]); step 1 denoises pure noise, every later step re-noises the previous x̂0 to the next timestep with fresh
  noise. Training inputs of step k come from the generator's own chain (no teacher data), so training sees what
  inference sees. The export carries an LCMScheduler that does exactly this re-noising, so stock diffusers
  (`PixArtSigmaPipeline(..., timesteps=[...], guidance_scale=1)`) reproduces the chain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import LCMScheduler

from ..draws import StepDraws
from ..errors import UserError
from ..schedule import add_noise, scheduler_like
from .dmd import DMD

# LCMScheduler returns c_skip·x_t + c_out·x̂0 with c_skip = σ²/((t·s)² + σ²); at s = 1e5 that is x̂0 to ~1e-14,
# the pure predict-x̂0-then-renoise chain of DMD2. original_inference_steps = 1000 puts every timestep on its grid.
TIMESTEP_SCALING = 1e5


class GANHead(torch.nn.Module):
    """Realism logits from the hidden states (B, N, D) of one fake-score block: LayerNorm → MLP → 1.

    `per_token=True` scores every token (a patch discriminator, like DMD2's conv head that keeps a small spatial map):
    logits (B, N). `per_token=False` scores the mean-pooled tokens: logits (B,)."""

    def __init__(self, width: int, hidden: int = 256, per_token: bool = True):
        super().__init__()
        self.per_token = per_token
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.float()
        return self.net(tokens if self.per_token else tokens.mean(dim=1)).squeeze(-1)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN, discriminator side: softplus(−D(real)) + softplus(D(fake)) (DMD2 eq. 5), averaged over
    samples (and tokens, for a per-token head)."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN, generator side: softplus(−D(G(z))) (DMD2 eq. 4)."""
    return F.softplus(-logits_fake).mean()


class DMD2(DMD):
    def __init__(self, teacher, timesteps, gan: dict, real_images=None, **dmd):
        """`gan`: generator_weight, discriminator_weight, block, hidden, per_token, t_min, t_max, head_lr (their
        defaults and meaning: conf/distill/dmd2.yaml)."""
        dmd.pop("t_bar", None)  # DMD2 starts at timesteps[0]
        timesteps = [int(t) for t in timesteps]
        if not timesteps or any(not 1 <= t <= 999 for t in timesteps) or timesteps != sorted(set(timesteps))[::-1]:
            raise UserError(f"distill.timesteps={timesteps}; give distinct timesteps in 1..999 in decreasing order, "
                            f"e.g. [400] (one step) or [999, 749, 499, 249] (four)")
        super().__init__(teacher, t_bar=timesteps[0], **dmd)
        self.timesteps = timesteps
        self.gan_generator_weight = float(gan["generator_weight"])
        self.gan_discriminator_weight = float(gan["discriminator_weight"])
        self.gan_on = self.gan_generator_weight > 0 or self.gan_discriminator_weight > 0
        self.real = None
        if self.gan_on:
            if real_images is None:
                raise UserError("distill=dmd2 with a GAN needs real images: give a captioned image folder with "
                                "distill/real_images=folder distill.real_images.folder=DIR (docs/dmd2.md), or set "
                                "distill.gan.generator_weight=0 distill.gan.discriminator_weight=0")
            self.real = real_images(teacher)
            blocks = self.fake_score.transformer_blocks
            block = len(blocks) // 2 if gan["block"] is None else int(gan["block"])
            if not -len(blocks) <= block < len(blocks):
                raise UserError(f"distill.gan.block={block}; the fake score has {len(blocks)} blocks (0..{len(blocks) - 1})")
            self.gan_block = block % len(blocks)
            width = self.fake_score.config.num_attention_heads * self.fake_score.config.attention_head_dim
            # The head is part of the fake score: trained by its optimizer, saved in its checkpoint.
            self.fake_score.gan_head = GANHead(width, int(gan["hidden"]), bool(gan["per_token"])).to(teacher.device)
            # The head sees real and generated latents noised to t ~ U[t_min, t_max] (default: the fake score's ε-MSE
            # range). On that range the head reads the generated side off the fake score's own denoising forward
            # (one fake-score forward and backward fewer per update); another range costs a forward of its own.
            self.gan_t_range = (self.fake_t_range[0] if gan["t_min"] is None else int(gan["t_min"]),
                                self.fake_t_range[1] if gan["t_max"] is None else int(gan["t_max"]))
            if not 0 <= self.gan_t_range[0] < self.gan_t_range[1] <= 999:
                raise UserError(f"distill.gan.t_min/t_max={list(self.gan_t_range)}; give 0 <= t_min < t_max <= 999")
            self.gan_shares_forward = self.gan_t_range == tuple(self.fake_t_range)
            # A fresh head at the fake score's lr (2e-5) would not learn in a few hundred steps: its own lr.
            self.optimizers["fake_score"].add_param_group({"params": list(self.fake_score.gan_head.parameters()),
                                                           "lr": float(gan["head_lr"])})
            self._features = self._denoising_features = None  # the hooked block's output: last forward, ε-MSE's
            blocks[self.gan_block].register_forward_hook(self._keep_features)

    # ---- backward simulation (DMD2 §4.4) --------------------------------------------------------
    def draw_inputs(self, batch_size: int, gen: StepDraws) -> dict:
        """z, each sample's step k ~ U{0..K−1}, and the re-noising noise of the chain up to it."""
        return {"z": self._noise(batch_size, gen),
                "step": gen.randint(0, len(self.timesteps), batch_size).to(self.teacher.device),
                "renoise": [self._noise(batch_size, gen) for _ in self.timesteps[1:]]}

    @torch.no_grad()
    def simulate(self, generator, embeds, mask, z, steps: torch.Tensor, renoise: list) -> torch.Tensor:
        """The input of step `steps[i]` for each sample: its own chain from z, x̂0 re-noised to the next timestep."""
        x = z.clone()
        for j in range(self._chain_length(steps)):
            rows = steps > j  # only the samples whose chain goes on past step j (about half, for 4 steps)
            if not rows.any():  # another process's samples still need step j: a throwaway row keeps the processes'
                self.generate(generator, embeds[:1], mask[:1], x[:1], None)  # forwards (FSDP gathers in each) in step
                continue
            t = torch.full((int(rows.sum()),), self.timesteps[j], device=x.device, dtype=torch.long)
            x0 = self.generate(generator, embeds[rows], mask[rows], x[rows], t)
            t_next = torch.full_like(t, self.timesteps[j + 1])
            # ≡ LCMScheduler.step's re-noise
            x[rows] = add_noise(x0, renoise[j][rows], t_next, self.teacher.alphas_cumprod).to(x.dtype)
        return x

    def _chain_length(self, steps: torch.Tensor) -> int:
        """How many chain steps to run: this batch's deepest, or every process's when sharded (they must match)."""
        if len(self.timesteps) == 1:
            return 0  # one step: no chain
        deepest = torch.tensor([int(steps.max()) if len(steps) else 0], device=steps.device)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            deepest = self.accelerator.gather(deepest)
        return int(deepest.max())

    def generator_input(self, draws: dict, rows: slice, embeds, mask):
        steps = draws["step"][rows]
        x = self.simulate(self.generator, embeds, mask, draws["z"][rows], steps, [n[rows] for n in draws["renoise"]])
        return x, torch.tensor(self.timesteps, device=x.device)[steps]

    # ---- the GAN (DMD2 §4.2) ----------------------------------------------------------------------
    def _keep_features(self, module, args, output):
        self._features = output[0] if isinstance(output, tuple) else output

    def _unwrapped_fake(self):
        return self._unwrap(self.fake_score)

    def realism(self, x0, embeds, mask, t, noise, network) -> torch.Tensor:
        """The head's logit on x0 noised to t, through the fake score's trunk."""
        x_t = add_noise(x0.float(), noise, t, self.teacher.alphas_cumprod)
        self.teacher.eps(x_t.to(self.teacher.dtype), t, embeds, mask, transformer=network)
        return self._unwrapped_fake().gan_head(self._features)

    def draw_extra(self, batch_size: int, gen: StepDraws) -> dict:
        if not self.gan_on:
            return {}
        t = lambda: self._timesteps(batch_size, *self.gan_t_range, gen)  # noqa: E731
        real = [self.real.sample(batch_size, gen, self.teacher.device, self.teacher.dtype)
                for _ in range(self.fake_updates_per_step)]
        extra = {"t_gen": t(), "noise_gen": self._noise(batch_size, gen), "real": real,
                 "t_real": [t() for _ in real], "noise_real": [self._noise(batch_size, gen) for _ in real]}
        if not self.gan_shares_forward:
            extra.update(t_fake=[t() for _ in real], noise_fake=[self._noise(batch_size, gen) for _ in real])
        return extra

    def generator_extra_losses(self, x0_hat, embeds, mask, extra: dict, rows: slice) -> list:
        if not self.gan_generator_weight:
            return []
        # Through the fake score, frozen for the generator's update (DMD.train_step); the unwrapped network: no DDP
        # gradient sync for it.
        logits = self.realism(x0_hat, embeds, mask, extra["t_gen"][rows], extra["noise_gen"][rows],
                              self._unwrapped_fake())
        return [("loss_gan_g", generator_gan_loss(logits), self.gan_generator_weight)]

    def fake_score_loss(self, samples, embeds, mask, t, noise) -> torch.Tensor:
        loss = super().fake_score_loss(samples, embeds, mask, t, noise)
        self._denoising_features = self._features if self.gan_on else None  # the generated side of the GAN
        return loss

    def fake_extra_losses(self, x0, embeds, mask, extra: dict, rows: slice, update: int) -> list:
        if not self.gan_discriminator_weight:
            return []
        real_x0, real_embeds, real_mask = (r[rows] for r in extra["real"][update])
        if self.gan_shares_forward:  # the ε-MSE forward just run: x0 noised to t ~ U[fake_t_range]
            logits_fake = self._unwrapped_fake().gan_head(self._denoising_features)
        else:
            logits_fake = self.realism(x0.detach(), embeds, mask, extra["t_fake"][update][rows],
                                       extra["noise_fake"][update][rows], self.fake_score)
        logits_real = self.realism(real_x0, real_embeds, real_mask, extra["t_real"][update][rows],
                                   extra["noise_real"][update][rows], self.fake_score)
        return [("loss_gan_d", discriminator_loss(logits_real, logits_fake), self.gan_discriminator_weight),
                ("d_real_acc", (logits_real > 0).float().mean(), 0.0)]

    # ---- inference and export -----------------------------------------------------------------
    def scheduler(self) -> LCMScheduler:
        """x̂0 at each timestep, re-noised with fresh noise to the next: the chain trained by backward simulation."""
        return scheduler_like(LCMScheduler, self.teacher.scheduler.config, timestep_scaling=TIMESTEP_SCALING,
                              original_inference_steps=1000, clip_sample=False, thresholding=False)

    @torch.no_grad()
    def sample(self, embeds, mask, noise) -> torch.Tensor:
        from ..sampling import sample_latents

        with self.sampling_network() as generator:
            def eps_fn(x, t):
                return self.teacher.eps(x, t, embeds, mask, transformer=generator)

            return sample_latents(eps_fn, self.scheduler(), noise, timesteps=self.timesteps)

    def card(self) -> dict:
        return {"method": "dmd2", "t_bar": self.timesteps[0] if len(self.timesteps) == 1 else None,
                "num_inference_steps": len(self.timesteps), "timesteps": list(self.timesteps), "guidance_scale": 1.0,
                "scheduler": "LCMScheduler", "eval_steps": [len(self.timesteps)],
                "gan": {"generator_weight": self.gan_generator_weight,
                        "discriminator_weight": self.gan_discriminator_weight,
                        "block": getattr(self, "gan_block", None), "t_range": list(getattr(self, "gan_t_range", []))}}
