"""The random numbers of one training step, drawn for the global batch.

Every process gets the same generator for a step and draws each batch-sized quantity (noise, timesteps, ...)
for the whole global batch, then keeps its own rows. So a run's numbers do not depend on how its global
batch is split: 2 processes × batch b see exactly the noise 1 process × batch 2b sees, and the only
difference left between them is the order of floating-point sums (tests/test_fsdp.py compares them).
"""

from __future__ import annotations

import torch


class StepDraws:
    """Batch-sized draws for this process's rows of the global batch, and the number of the step they are for.

    `n` is always the local batch size; the draw covers `n × processes` rows and this process keeps rows
    `[process·n, (process+1)·n)`, the same rows `loop.batch_indices` gives it.
    `step` counts the run's training steps from 0 (the first step of a fresh run); a resumed run continues the
    count from its checkpoint, so a method's own schedule (a warm-up, a loss term that starts later) reads it here
    instead of counting its calls."""

    def __init__(self, generator: torch.Generator, process: int = 0, processes: int = 1, step: int = 0):
        self.generator, self.process, self.processes, self.step = generator, process, processes, step

    def _mine(self, drawn: torch.Tensor, n: int) -> torch.Tensor:
        return drawn[self.process * n:(self.process + 1) * n]

    def randn(self, shape) -> torch.Tensor:
        n, *rest = shape
        return self._mine(torch.randn((n * self.processes, *rest), generator=self.generator), n)

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        """Integers in [low, high)."""
        return self._mine(torch.randint(low, high, (n * self.processes,), generator=self.generator), n)

    def rand(self, n: int) -> torch.Tensor:
        return self._mine(torch.rand(n * self.processes, generator=self.generator), n)


def step_draws(generator: torch.Generator | StepDraws) -> StepDraws:
    """A method's train_step takes either: a plain generator means one process (tests, the planner)."""
    return generator if isinstance(generator, StepDraws) else StepDraws(generator)
