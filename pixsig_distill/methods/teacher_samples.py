"""x0 for distillation from prompts alone: the teacher's own sample of each prompt, made once and kept.

Consistency distillation (LCM, sCM) noises data latents x0 to x_t and follows the teacher's ODE from there. Without
images, the teacher's own samples are the data (data-free distillation): batches from teacher pairs
(`python -m pixsig_distill.make_pairs`, then data=cached data.folder=PAIRS) carry them as `latents`; for prompt-only
batches this makes the same pairs itself, once per prompt, with the teacher's sampler (`steps` DPM-Solver++ steps at
CFG `guidance_scale`, noise seeded by the prompt, as make_pairs does), and keeps them in memory (`cache_size`,
least recently used first out). The first epoch pays for the teacher's sampler; later epochs cost what pairs from
disk cost.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


class TeacherSamples:
    def __init__(self, teacher, steps: int | None, guidance_scale: float | None, cache_size: int, seed: int):
        if cache_size < 0:
            raise UserError(f"distill.pair_cache_size={cache_size}; use an integer >= 0 (0: no cache)")
        self.teacher, self.steps, self.guidance_scale = teacher, steps, guidance_scale
        self.cache_size, self.seed = cache_size, seed
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # prompt → teacher sample (LRU)
        self._warned = False

    def latents(self, batch: dict) -> torch.Tensor:
        """x0 of each row: the batch's `latents` (teacher pairs) if it has them, else the teacher's sample of its
        prompt, made on first use and cached."""
        shape = self.teacher.latent_shape(len(batch["prompt"]))
        if "latents" in batch:
            latents = batch["latents"].float()
            if tuple(latents.shape) != shape:
                raise UserError(f"the teacher pairs' latents have shape {tuple(latents.shape[1:])} but this "
                                f"teacher makes {shape[1:]}; remake them with python -m pixsig_distill.make_pairs "
                                f"and this model")
            return latents
        found = {p: self.cache[p] for p in batch["prompt"] if p in self.cache}
        for p in found:
            self.cache.move_to_end(p)  # least recently used goes first
        missing = [i for i, p in enumerate(batch["prompt"]) if p not in found]
        if missing:
            if not self._warned:
                self._warned = True
                log.warning("the batches carry no teacher latents: a teacher sample is made per prompt on first use "
                            "(%s steps, CFG %s) and cached; precompute them with python -m pixsig_distill.make_pairs "
                            "and train with data=cached data.folder=PAIRS to skip this",
                            self.steps or self.teacher.num_inference_steps,
                            self.guidance_scale or self.teacher.guidance_scale)
            found.update(self._make(batch, missing))
        return torch.stack([found[p] for p in batch["prompt"]]).to(self.teacher.device).float()

    @torch.no_grad()
    def _make(self, batch: dict, rows: list[int]) -> dict[str, torch.Tensor]:
        """The teacher's sample for each prompt in `rows`, from noise seeded by (seed, prompt) (make_pairs' way)."""
        prompts = [batch["prompt"][i] for i in rows]
        noise = torch.stack([torch.randn(self.teacher.latent_shape(1)[1:], generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + zlib.crc32(p.encode("utf-8")))) for p in prompts])
        latents = self.teacher.sample(embeds=batch["embeds"][rows], mask=batch["mask"][rows],
                                      noise=noise.to(self.teacher.device, self.teacher.dtype),
                                      num_inference_steps=self.steps, guidance_scale=self.guidance_scale)
        made = dict(zip(prompts, latents.float().cpu()))
        self.cache.update(made)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return made
