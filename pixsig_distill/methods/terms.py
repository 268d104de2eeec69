"""Extra loss terms DMD adds to its objectives: plain objects with one interface (`distill.regression`,
`distill.gan`, `distill.rewards.<name>`).

A term may add to the generator's loss, to the fake score's loss, or both. DMD calls, per step:
- `draw(dmd, batch, gen)`: what the term needs of the batch, and its random numbers for the whole batch (then
  sliced, so micro-batches see the numbers one large batch sees);
- `generator_losses(dmd, x0_hat, embeds, mask, draws, rows, micro)` while the generator learns (the fake score is
  frozen then; `micro`: (index, count) of this micro-batch, whose losses DMD divides by count);
- `fake_score_losses(dmd, x0, embeds, mask, draws, rows, update)` right after the fake score's ε-MSE forward on the
  generator's samples x0, during fake-score update `update`.
Each returns [(log name, loss, weight)]; weight 0 logs a figure without training on it. `attach(dmd)` runs once,
after DMD built its networks (a term that trains parameters hands them to an optimizer there); `card()` adds to
the export's card; `modules()` names the networks it holds besides DMD's (the planner counts them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError


class Term:
    """No-op defaults of the term interface (see the module docstring)."""

    # Does the generator's loss back-propagate through the fake score? DeepSpeed ZeRO-3 cannot run a backward of
    # one engine through another (checked by DMD.prepare).
    generator_loss_reads_fake_score = False

    def attach(self, dmd) -> None:
        pass

    def draw(self, dmd, batch: dict, gen) -> dict:
        return {}

    def generator_losses(self, dmd, x0_hat, embeds, mask, draws: dict, rows: slice, micro: tuple[int, int]) -> list:
        return []

    def fake_score_losses(self, dmd, x0, embeds, mask, draws: dict, rows: slice, update: int) -> list:
        return []

    def card(self) -> dict:
        """What the export's card records about the term."""
        return {}

    def modules(self) -> list:
        """Networks the term holds besides DMD's own (a reward model): what a memory plan must count."""
        return []

    def objective_models(self) -> dict[str, str]:
        """Pretrained models the term's loss reads, name -> weights identity (pixsig_distill/identity.py): an
        evaluation that reads one of them is not independent evidence about the student (evaluation/evaluate.py)."""
        return {}


class Regression(Term):
    """Distance between G(z_i) and the teacher's multi-step sample y_i from the same noise (DMD eq. 9), on its own
    batch of teacher pairs (`python -m pixsig_distill.make_pairs`), once per step."""

    @staticmethod
    def plan_stand_in(node):
        return None  # it reads teacher pairs from disk; a plan leaves it out (plan_note)

    @staticmethod
    def plan_note(node) -> str:
        return ("the regression loss is not modelled (one more generator pass on distill.regression.batch_size "
                "pairs, plus LPIPS' VGG if chosen)")

    def __init__(self, pairs, weight: float = 0.25, distance: str = "latent_mse", batch_size: int = 8):
        if pairs is None:
            raise UserError("distill.regression needs teacher pairs; make them with python -m "
                            "pixsig_distill.make_pairs and set distill.regression.pairs.folder=..., or set "
                            "distill.regression=null")
        if distance not in ("latent_mse", "lpips"):
            raise UserError(f"distill.regression.distance={distance!r}; use latent_mse or lpips")
        self.pairs, self.weight, self.distance, self.batch_size = pairs, float(weight), distance, batch_size
        self._lpips = None

    def draw(self, dmd, batch: dict, gen) -> dict:
        return {"rows": gen.randint(0, len(self.pairs), self.batch_size).tolist()}  # per process, like batch_size

    def generator_losses(self, dmd, x0_hat, embeds, mask, draws, rows, micro) -> list:
        index, count = micro
        if index:  # its own batch, once per step: on the first micro-batch, undivided
            return []
        items = [self.pairs[i] for i in draws["rows"]]
        teacher = dmd.teacher
        z = torch.stack([it["noise"] for it in items]).to(teacher.device)
        target = torch.stack([it["latents"] for it in items]).to(teacher.device).float()
        pair_embeds = torch.stack([it["embeds"] for it in items]).to(teacher.device, teacher.dtype)
        pair_mask = torch.stack([it["mask"] for it in items]).to(teacher.device)
        x0 = dmd.generate(dmd.generator, pair_embeds, pair_mask, z)
        loss = F.mse_loss(x0, target) if self.distance == "latent_mse" else self._lpips_distance(teacher, x0, target)
        return [("loss_reg", loss * count, self.weight)]

    def _lpips_distance(self, teacher, x0, target) -> torch.Tensor:
        if self._lpips is None:
            from ..perceptual import LPIPS

            self._lpips = LPIPS("vgg", offline_hint="use distill.regression.distance=latent_mse").to(x0.device)
        scale = teacher.vae.config.scaling_factor
        images = teacher.vae.decode(x0 / scale).sample.clamp(-1, 1)
        with torch.no_grad():
            targets = teacher.vae.decode(target / scale).sample.clamp(-1, 1)
        return self._lpips(images.float(), targets.float())
