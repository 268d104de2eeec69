"""Reward-guided DMD: a differentiable reward on the generator's decoded samples, maximised next to DMD's loss.

DMDR (Jiang et al. 2025, "Distribution Matching Distillation Meets Reinforcement Learning") trains DMD and a
reward objective jointly: the DM loss keeps the generator on the teacher's distribution and so regularises the
reward, and the reward tilts the target toward what it prefers, p_real(x | c)·exp(λ·r(x, c)). With a reward that
is differentiable in the image, the generator's loss for that tilted target is

    L_G = L_DM − λ · r(D(x̂0), c),       x̂0 = G(z, c), D the VAE decoder,

whose gradient is DMD's plus −λ∇r (the reward's gradient pulled back through the decoder and the generator).
`weight` is λ. The reward model is any `_target_` object called as `reward(images, prompts) -> (B,)` on images
in [−1, 1] (the toy world: pixsig_distill/toy/reward.py; real models: evaluation/preference.py's rewards).
Judge a reward-guided student only with metrics it did not train on (docs/rewards.md).
"""

from __future__ import annotations


from .terms import Term


class Reward(Term):
    def __init__(self, reward, weight: float):
        self.reward, self.weight = reward, float(weight)
        self.name = getattr(reward, "name", type(reward).__name__)

    def attach(self, dmd) -> None:
        if hasattr(self.reward, "to"):
            self.reward.to(dmd.teacher.device)

    def draw(self, dmd, batch: dict, gen) -> dict:
        if "prompt" not in batch:
            from ..errors import UserError

            raise UserError(f"the {self.name} reward reads the prompts, and these batches carry none; use data=toy, "
                            f"data=prompts or a text cache made by cache_text (it stores them)")
        return {"prompts": list(batch["prompt"])}

    def generator_losses(self, dmd, x0_hat, embeds, mask, draws, rows, micro) -> list:
        vae = dmd.teacher.vae
        images = vae.decode((x0_hat / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        reward = self.reward(images.clamp(-1, 1), draws["prompts"][rows])
        return [(f"reward_{self.name}", reward.mean(), -self.weight)]  # the generator minimises −λ·r

    def card(self) -> dict:
        return {"reward_" + self.name: self.weight}
