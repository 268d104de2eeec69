"""The DMD generator's input: pure noise at T̄ (one step), or its own chain over a few timesteps (DMD2 §4.4).

One step (`timesteps=[T̄]`, the PixArt DMD recipe): the generator denoises unscaled pure noise z labelled T̄, and the
student is one DDPM step from T̄ (DDPMScheduler returns x̂0 there).

Several steps (e.g. [999, 749, 499, 249]; Yin et al. 2024, "Improved Distribution Matching Distillation", §4.4,
backward simulation): step 1 denoises pure noise, every later step re-noises the previous x̂0 to the next timestep
with fresh noise. The input of step k in training comes from the generator's own chain (no teacher data), so
training sees what inference sees. The export carries an LCMScheduler that does exactly this re-noising, so stock
diffusers (`PixArtSigmaPipeline(..., timesteps=[...], guidance_scale=1)`) reproduces the chain.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, LCMScheduler

from ..draws import StepDraws
from ..errors import UserError
from ..schedule import add_noise, scheduler_like

# LCMScheduler returns c_skip·x_t + c_out·x̂0 with c_skip = σ²/((t·s)² + σ²); at s = 1e5 that is x̂0 to ~1e-14,
# the pure predict-x̂0-then-renoise chain. original_inference_steps = 1000 puts every timestep on its grid.
TIMESTEP_SCALING = 1e5


def check_timesteps(timesteps, key: str = "distill.timesteps") -> list[int]:
    """Distinct integers in 1..999, decreasing; anything else (400.7, "abc", [200, 400]) is refused in one line that
    names the setting (`key`)."""
    values = [timesteps] if isinstance(timesteps, (int, float, str)) else list(timesteps)  # 400 means [400]
    ok = values and all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 999 for t in values)
    if not ok or values != sorted(set(values), reverse=True):
        raise UserError(f"{key}={list(values)!r}; give distinct integer timesteps in 1..999 in decreasing "
                        f"order, e.g. [400] (one step) or [999,749,499,249] (four)")
    return values


class BackwardSimulation:
    """Where each training sample of the generator starts, and the scheduler that samples the same way."""

    def __init__(self, timesteps, key: str = "distill.timesteps"):
        self.timesteps = check_timesteps(timesteps, key)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def draw(self, dmd, batch_size: int, gen: StepDraws) -> dict:
        """z, and for several steps: each sample's step k ~ U{0..K−1} and the re-noising noise of its chain."""
        draws = {"z": dmd.draw_noise(batch_size, gen)}
        if self.steps > 1:
            draws["step"] = gen.randint(0, self.steps, batch_size)
            draws["renoise"] = [dmd.draw_noise(batch_size, gen) for _ in self.timesteps[1:]]
        return draws

    def input(self, dmd, draws: dict, rows: slice, embeds, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, t) the generator denoises for these rows."""
        z = draws["z"][rows]
        if self.steps == 1:
            return z, torch.full((z.shape[0],), self.timesteps[0], device=z.device, dtype=torch.long)
        steps = draws["step"][rows].to(z.device)
        x = self.simulate(dmd, embeds, mask, z, steps, [n[rows] for n in draws["renoise"]])
        return x, torch.tensor(self.timesteps, device=x.device)[steps]

    @torch.no_grad()
    def simulate(self, dmd, embeds, mask, z, steps: torch.Tensor, renoise: list) -> torch.Tensor:
        """The input of step `steps[i]` for each sample: its own chain from z, x̂0 re-noised to the next timestep."""
        x = z.clone()
        for j in range(self._chain_length(dmd, steps)):
            rows = steps > j  # only the samples whose chain goes on past step j (about half, for 4 steps)
            if not rows.any():  # another process's samples still need step j: a throwaway row keeps the processes'
                dmd.generate(dmd.generator, embeds[:1], mask[:1], x[:1], None)  # forwards (FSDP gathers) in step
                continue
            t = torch.full((int(rows.sum()),), self.timesteps[j], device=x.device, dtype=torch.long)
            x0 = dmd.generate(dmd.generator, embeds[rows], mask[rows], x[rows], t)
            t_next = torch.full_like(t, self.timesteps[j + 1])
            # ≡ LCMScheduler.step's re-noise
            x[rows] = add_noise(x0, renoise[j][rows], t_next, dmd.teacher.denoiser.alphas_cumprod).to(x.dtype)
        return x

    @staticmethod
    def _chain_length(dmd, steps: torch.Tensor) -> int:
        """How many chain steps to run: this batch's deepest, or every process's when sharded (they must match)."""
        deepest = torch.tensor([int(steps.max()) if len(steps) else 0], device=steps.device)
        if dmd.accelerator is not None and dmd.accelerator.num_processes > 1:
            deepest = dmd.accelerator.gather(deepest)
        return int(deepest.max())

    # ---- inference ------------------------------------------------------------------------------
    def scheduler(self, teacher_scheduler_config):
        """One step: one DDPM step from T̄ returns x̂0 (the released PixArt DMD model's inference). Several: x̂0 at
        each timestep, re-noised with fresh noise to the next (the chain trained above)."""
        if self.steps == 1:
            return scheduler_like(DDPMScheduler, teacher_scheduler_config, clip_sample=False, thresholding=False,
                                  variance_type="fixed_small")
        return scheduler_like(LCMScheduler, teacher_scheduler_config, timestep_scaling=TIMESTEP_SCALING,
                              original_inference_steps=1000, clip_sample=False, thresholding=False)

    def card(self) -> dict:
        """The sampling recipe the export carries."""
        return {"t_bar": self.timesteps[0] if self.steps == 1 else None, "num_inference_steps": self.steps,
                "timesteps": list(self.timesteps), "guidance_scale": 1.0,
                "scheduler": "DDPMScheduler" if self.steps == 1 else "LCMScheduler", "eval_steps": [self.steps]}
