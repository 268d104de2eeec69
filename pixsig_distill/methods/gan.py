"""DMD2's GAN term (Yin et al. 2024, "Improved Distribution Matching Distillation", §4.2): a small classifier head on
the fake score's features (the hidden states of one transformer block, `block`) tells noised real latents from
noised generator samples. The head and the fake score's trunk learn it with the fake score's update (the generated
side read off the fake score's own denoising forward); the generator gets the non-saturating term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..schedule import add_noise
from .terms import Term


HEADS = ("projection", "per_token", "pooled")


class GANHead(torch.nn.Module):
    """Realism logits from the hidden states (B, N, D) of one fake-score block: LayerNorm → MLP per token, then

    - `per_token`: a logit per token (a patch discriminator, like DMD2's conv head that keeps a small spatial map):
      logits (B, N);
    - `pooled`: one logit from the mean of the tokens' hidden vectors: (B,);
    - `projection`: `pooled` plus ⟨W·c, h⟩, the inner product of the pooled hidden vector h with a projection of the
      pooled caption embedding c (the projection discriminator, Miyato & Koyama 2018, eq. 3): (B,). It scores how
      well the image fits its caption as a whole, which a head that only reads tokens has to infer per token.
    """

    def __init__(self, width: int, hidden: int = 256, kind: str = "projection", caption_width: int | None = None):
        super().__init__()
        if kind not in HEADS:
            raise UserError(f"distill.gan.head={kind!r}; use one of {', '.join(HEADS)}")
        self.kind = kind
        self.trunk = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, hidden), torch.nn.SiLU())
        self.out = torch.nn.Linear(hidden, 1)
        self.caption = torch.nn.Linear(caption_width, hidden, bias=False) if kind == "projection" else None

    def forward(self, tokens: torch.Tensor, embeds: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.trunk(tokens.float())
        if self.kind == "per_token":
            return self.out(h).squeeze(-1)
        pooled = h.mean(dim=1)
        logits = self.out(pooled).squeeze(-1)
        if self.caption is not None:
            weights = mask.to(embeds.dtype)[..., None]
            caption = (embeds * weights).sum(1).float() / weights.sum(1).clamp(min=1).float()
            logits = logits + (self.caption(caption) * pooled).sum(-1)
        return logits


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN, discriminator side: softplus(−D(real)) + softplus(D(fake)) (DMD2 eq. 5), averaged over
    samples (and tokens, for a per-token head)."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN, generator side: softplus(−D(G(z))) (DMD2 eq. 4)."""
    return F.softplus(-logits_fake).mean()


class GAN(Term):
    """`real_images`: built with the teacher (conf/distill/gan/real_images/). The other settings, their defaults and
    meaning: conf/distill/dmd2.yaml."""

    generator_loss_reads_fake_score = True  # the generator's GAN loss is the head's logit on the fake score's features

    def __init__(self, real_images, generator_weight: float, discriminator_weight: float, block: int | None,
                 hidden: int, head: str, t_min: int | None, t_max: int | None, head_lr: float):
        if real_images is None:
            raise UserError("distill.gan needs real images: give a captioned image folder with "
                            "distill/gan/real_images=folder distill.gan.real_images.folder=DIR (docs/dmd2.md), or "
                            "set distill.gan=null for DMD without a GAN")
        self.real_images = real_images
        self.generator_weight, self.discriminator_weight = float(generator_weight), float(discriminator_weight)
        self.block, self.hidden, self.head = block, int(hidden), head
        self.t_range, self.head_lr = (t_min, t_max), float(head_lr)
        self.real = self._features = None

    def attach(self, dmd) -> None:
        """The head joins the fake score (trained by its optimizer at its own lr, saved in its checkpoint) and reads
        the output of one of its blocks through a forward hook."""
        self.real = self.real_images(dmd.teacher)
        fake_score = dmd.fake_score
        blocks = fake_score.transformer_blocks
        block = len(blocks) // 2 if self.block is None else int(self.block)
        if not -len(blocks) <= block < len(blocks):
            raise UserError(f"distill.gan.block={block}; the fake score has {len(blocks)} blocks (0..{len(blocks) - 1})")
        self.block = block % len(blocks)
        width = fake_score.config.num_attention_heads * fake_score.config.attention_head_dim
        fake_score.gan_head = GANHead(width, self.hidden, self.head,
                                      fake_score.config.caption_channels).to(dmd.teacher.device)
        # The head sees real and generated latents noised to t ~ U[t_min, t_max] (default: the fake score's ε-MSE
        # range). On that range the head reads the generated side off the fake score's own denoising forward
        # (one fake-score forward and backward fewer per update); another range costs a forward of its own.
        low, high = dmd.fake_t_range
        self.t_range = (low if self.t_range[0] is None else int(self.t_range[0]),
                        high if self.t_range[1] is None else int(self.t_range[1]))
        if not 0 <= self.t_range[0] < self.t_range[1] <= 999:
            raise UserError(f"distill.gan.t_min/t_max={list(self.t_range)}; give 0 <= t_min < t_max <= 999")
        self.shares_forward = self.t_range == tuple(dmd.fake_t_range)
        # A fresh head at the fake score's lr (2e-5) would not learn in a few hundred steps: its own lr.
        dmd.optimizers["fake_score"].add_param_group({"params": list(fake_score.gan_head.parameters()),
                                                      "lr": self.head_lr})
        blocks[self.block].register_forward_hook(self._keep_features)

    def _keep_features(self, module, args, output):
        self._features = output[0] if isinstance(output, tuple) else output

    def realism(self, dmd, x0, embeds, mask, t, noise, network) -> torch.Tensor:
        """The head's logit on x0 noised to t, through the fake score's trunk."""
        denoiser = dmd.teacher.denoiser
        x_t = add_noise(x0.float(), noise, t, denoiser.alphas_cumprod)
        denoiser.eps(x_t.to(dmd.teacher.dtype), t, embeds, mask, transformer=network)
        return dmd.unwrap(dmd.fake_score).gan_head(self._features, embeds, mask)

    def draw(self, dmd, batch: dict, gen) -> dict:
        batch_size = batch["embeds"].shape[0]
        t = lambda: dmd.draw_timesteps(batch_size, *self.t_range, gen)  # noqa: E731
        real = [self.real.sample(batch_size, gen, dmd.teacher.device, dmd.teacher.dtype)
                for _ in range(dmd.fake_updates_per_step)]
        draws = {"t_gen": t(), "noise_gen": dmd.draw_noise(batch_size, gen), "real": real,
                 "t_real": [t() for _ in real], "noise_real": [dmd.draw_noise(batch_size, gen) for _ in real]}
        if not self.shares_forward:
            draws.update(t_fake=[t() for _ in real], noise_fake=[dmd.draw_noise(batch_size, gen) for _ in real])
        return draws

    def generator_losses(self, dmd, x0_hat, embeds, mask, draws, rows, micro) -> list:
        if not self.generator_weight:
            return []
        # Through the fake score, frozen for the generator's update (DMD.train_step); the unwrapped network: no DDP
        # gradient sync for it.
        logits = self.realism(dmd, x0_hat, embeds, mask, draws["t_gen"][rows], draws["noise_gen"][rows],
                              dmd.unwrap(dmd.fake_score))
        return [("loss_gan_g", generator_gan_loss(logits), self.generator_weight)]

    def fake_score_losses(self, dmd, x0, embeds, mask, draws, rows, update) -> list:
        if not self.discriminator_weight:
            return []
        real_x0, real_embeds, real_mask = (r[rows] for r in draws["real"][update])
        if self.shares_forward:  # the ε-MSE forward just run: x0 noised to t ~ U[fake_t_range]
            logits_fake = dmd.unwrap(dmd.fake_score).gan_head(self._features, embeds, mask)
        else:
            logits_fake = self.realism(dmd, x0.detach(), embeds, mask, draws["t_fake"][update][rows],
                                       draws["noise_fake"][update][rows], dmd.fake_score)
        logits_real = self.realism(dmd, real_x0, real_embeds, real_mask, draws["t_real"][update][rows],
                                   draws["noise_real"][update][rows], dmd.fake_score)
        return [("loss_gan_d", discriminator_loss(logits_real, logits_fake), self.discriminator_weight),
                ("d_real_acc", (logits_real > 0).float().mean(), 0.0),
                ("d_fake_acc", (logits_fake < 0).float().mean(), 0.0)]

    def card(self) -> dict:
        return {"gan": {"generator_weight": self.generator_weight, "discriminator_weight": self.discriminator_weight,
                        "block": self.block, "head": self.head, "t_range": list(self.t_range)}}
