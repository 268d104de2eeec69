"""Reward-guided DMD: a differentiable reward on the generator's decoded samples, maximised next to DMD's loss.

DMDR (Jiang et al. 2025, "Distribution Matching Distillation Meets Reinforcement Learning") trains DMD and a
reward objective jointly: the DM loss keeps the generator on the teacher's distribution and so regularises the
reward, and the reward tilts the target toward what it prefers, p_real(x | c)·exp(λ·r(x, c)). With a reward that
is differentiable in the image, the generator's loss for that tilted target is

    L_G = L_DM − λ · r(D(x̂0), c),       x̂0 = G(z, c), D the VAE decoder,

whose gradient is DMD's plus −λ∇r (the reward's gradient pulled back through the decoder and the generator).
`weight` is λ. The reward model is any `_target_` object called as `reward(images, prompts) -> (B,)` on images
in [−1, 1] (the toy world: pixsig_distill/toy/reward.py; HPSv2, PickScore, ImageReward: reward_models.py).
Judge a reward-guided student only with metrics it did not train on (docs/rewards.md).
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from ..errors import UserError
from .terms import Term


class Reward(Term):
    """`weight`: λ. `ceiling`: null, or a reward value above which a sample gets no more push (r clipped at it): a
    reward without a ceiling keeps pulling every sample toward its single most-rewarded image per prompt, which costs
    diversity (docs/rewards.md); with a ceiling at what real images reach, only the samples below it are moved.
    `start_step`: the reward joins at this step (a cold start: DMD alone before it, as DMDR trains)."""

    def __init__(self, reward, weight: float, ceiling: float | None, start_step: int):
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise UserError(f"a reward's start_step={start_step!r}; use an integer >= 0 (0: from the first step)")
        self.reward, self.weight, self.start_step = reward, float(weight), start_step
        self.ceiling = None if ceiling is None else float(ceiling)
        self.name = getattr(reward, "name", type(reward).__name__)

    def attach(self, dmd) -> None:
        if hasattr(self.reward, "to"):
            self.reward.to(dmd.teacher.device)

    def draw(self, dmd, batch: dict, gen) -> dict:
        if "prompt" not in batch:
            raise UserError(f"the {self.name} reward reads the prompts, and these batches carry none; use data=toy, "
                            f"data=prompts or a text cache made by cache_text (it stores them)")
        return {"prompts": list(batch["prompt"]), "on": gen.step >= self.start_step}

    def generator_losses(self, dmd, x0_hat, embeds, mask, draws, rows, micro) -> list:
        if not draws["on"]:  # a cold start: DMD alone until start_step, as DMDR first trains DMD without the reward
            return []
        vae = dmd.teacher.vae
        images = vae.decode((x0_hat / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        reward = self.reward(images.clamp(-1, 1), draws["prompts"][rows])
        if self.ceiling is None:
            return [(f"reward_{self.name}", reward.mean(), -self.weight)]  # the generator minimises −λ·r
        # −λ·min(r, ceiling): the samples at or above the ceiling get no gradient; the raw reward is logged too
        return [(f"reward_{self.name}", reward.mean(), 0.0),
                (f"reward_{self.name}_clipped", reward.clamp(max=self.ceiling).mean(), -self.weight)]

    def modules(self) -> list:
        return [self.reward] if isinstance(self.reward, torch.nn.Module) else []

    def card(self) -> dict:
        if getattr(self.reward, "random_weights", False):  # a sizing run's stand-in: no reward was trained for
            return {}
        return {"reward_" + self.name: self.weight,
                **({f"reward_{self.name}_ceiling": self.ceiling} if self.ceiling is not None else {}),
                **({f"reward_{self.name}_start_step": self.start_step} if self.start_step else {})}

    def objective_models(self) -> dict[str, str]:
        return self.reward.objective_models()  # every reward names the pretrained models it reads


class CLIPRewardStandIn(torch.nn.Module):
    """A CLIP-style image reward of a real reward model's size with random weights: for planning a reward-guided
    run and for the real-width tests, where no reward model can be downloaded. The defaults are HPSv2's image
    tower (open_clip ViT-H-14: width 1280, 32 layers, 16 heads, 14 px patches at 224 px, 1024-d embedding); the
    text side is a fixed random unit vector per prompt (no gradient reaches it, so its size does not matter to the
    step). It measures nothing: use it to size a run, never to train one for its samples."""

    name = "clip_stand_in"
    random_weights = True  # training refuses it unless sizing_run=true (config_checks.refuse_random_weights)

    def __init__(self, width: int = 1280, layers: int = 32, heads: int = 16, patch_size: int = 14,
                 image_size: int = 224, embed_dim: int = 1024):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.image_size, self.embed_dim = image_size, embed_dim
        self.visual = VisionTransformer(image_size, patch_size, width, layers, heads, mlp_ratio=4.0,
                                        output_dim=embed_dim).requires_grad_(False)

    def objective_models(self) -> dict[str, str]:
        return {}  # random weights: no pretrained model that an evaluation could share

    def text_features(self, prompts: list[str], device) -> torch.Tensor:
        rows = [torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return F.normalize(torch.stack(rows), dim=-1).to(device)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = F.interpolate((images + 1) / 2, size=(self.image_size, self.image_size), mode="bilinear",
                               antialias=False, align_corners=False)
        features = F.normalize(self.visual(pixels.to(next(self.visual.parameters()).dtype)).float(), dim=-1)
        return (features * self.text_features(prompts, features.device)).sum(-1)
