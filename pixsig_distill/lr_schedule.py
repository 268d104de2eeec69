"""The learning-rate schedule of a run (`train.lr_schedule`): a warm-up and a decay over the training steps.

One diffusers schedule (`diffusers.optimization.get_scheduler`, a torch `LambdaLR` over the configured lr) per
optimizer of the method, stepped by the loop once per training step: step s trains every network at
lr·factor(s), however many updates a method makes inside a step (DMD's fake score updates several times in a
step, all at that step's lr). The decay ends at `train.max_steps`.

The schedulers' state (the step they are at) is saved in every checkpoint's state.json and restored on resume, so
a resumed run continues the schedule where it stopped. The base lr is the command's, as for the optimizers
(checkpoint.keep_configured_hyperparameters: a resume with a new lr takes it, and the log says so).
"""

from __future__ import annotations

import warnings

from .errors import UserError

# diffusers.optimization.SchedulerType, less piecewise_constant (its rules are a string of its own syntax)
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def check_lr_schedule(node) -> None:
    """`train.lr_schedule` before anything is loaded: a known name and a warm-up of 0 or more steps."""
    name, warmup = node.get("name"), node.get("warmup_steps")
    if name not in SCHEDULES:
        raise UserError(f"train.lr_schedule.name={name!r}; use one of {', '.join(SCHEDULES)}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"train.lr_schedule.warmup_steps={warmup!r}; use an integer >= 0 (0: no warm-up)")
    if warmup and name == "constant":
        raise UserError(f"train.lr_schedule.warmup_steps={warmup} with name=constant, which has no warm-up; use "
                        f"name=constant_with_warmup (or linear, cosine, ...)")


class LRSchedules:
    """name → a diffusers schedule of the optimizer of that name; `step()` after every training step.

    Built after `prepare` (accelerate's and DeepSpeed's optimizer wrappers pass their param_groups through to the
    optimizer that steps) and after a resume has restored the optimizers."""

    def __init__(self, optimizers: dict, name: str, warmup_steps: int, total_steps: int):
        from diffusers.optimization import get_scheduler

        for optimizer in optimizers.values():  # a resumed optimizer's groups carry the saved run's base lr
            for group in optimizer.param_groups:
                group.pop("initial_lr", None)
        self.schedulers = {key: get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                                              num_training_steps=total_steps)
                           for key, optimizer in optimizers.items()}

    def step(self) -> None:
        with warnings.catch_warnings():
            # DeepSpeed's engine steps its own optimizer, not the wrapper the scheduler watches; torch warns that the
            # scheduler stepped first. The order is right: the loop steps the schedule after the training step.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for scheduler in self.schedulers.values():
                scheduler.step()

    def factors(self) -> dict[str, float]:
        """The current step's factor of each optimizer's base lr."""
        return {key: float(s.lr_lambdas[0](s.last_epoch)) for key, s in self.schedulers.items()}

    def lrs(self) -> dict[str, float]:
        """`lr_<name>`: the learning rate the current step trains with (what the log and the trackers show)."""
        return {f"lr_{key}": float(s.get_last_lr()[0]) for key, s in self.schedulers.items()}

    def state_dict(self) -> dict:
        """JSON: each scheduler's counters (`last_epoch`: the steps it has taken) and base lrs."""
        return {key: {k: v for k, v in s.state_dict().items() if k != "lr_lambdas"}
                for key, s in self.schedulers.items()}

    def load_state_dict(self, state: dict | None, step: int) -> None:
        """Continue each schedule at the saved step; the base lr stays the configured one. A checkpoint written
        before runs had schedules holds none: its schedule is the one at its step."""
        for key, scheduler in self.schedulers.items():
            saved = {k: v for k, v in (state or {}).get(key, {"last_epoch": step}).items() if k != "base_lrs"}
            scheduler.load_state_dict({**saved, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs
