"""What a training method is: the one contract that the loop, the planner, the exports and the tests rely on.

A method is a class named by its YAML (`conf/distill/<name>.yaml`, `_target_`), built with the teacher
(`config.build(cfg.distill, teacher=teacher)`); every setting is a required keyword argument, the YAML being the one
home of the defaults. It subclasses `Method`:

Required (the loop calls them):
- `models`: name → every network the loop trains (after `prepare`: as accelerate, FSDP2 or DeepSpeed wrapped it).
- `optimizers`: name → the optimizer of the network of the same name (optimizer states are saved, gathered and
  scattered by that name: distributed.py).
- `checkpoint_modules()`: name → every module a checkpoint holds, unwrapped: the trained networks (a LoRA network as
  its adapters, `TrainableParameters`) and their EMAs. The shared tests compare these.
- `prepare(accelerator)`: each trained network with its optimizer through `deepspeed_engines.prepare`, one call each
  (`prepare_networks` does that); also where a method refuses an engine it cannot run on, in one line.
- `train_step(batch, draws, micro_batches)`: one update of every trained network from `batch`, split into
  `micro_batches` (gradient accumulation, `common.accumulated_step`). `draws` (draws.StepDraws) gives the step's
  random numbers and its number (`draws.step`, for a method's own schedules); a plain torch.Generator is one process
  at step 0 (tests, the planner). Returns the logs: `loss*` keys (checked finite every step) and `grad_norm*` keys
  (a network whose norm is non-finite at every step of a logging interval stops the run), as tensors.
- `sample(embeds, mask, noise)`: the latents the student makes, as its export samples them (previews).
- `export(out_dir)`: a folder stock diffusers loads. A student's card (pixsig_student.json, `common.export_pipeline`)
  holds the keys of `CARD_KEYS`, checked when it is written (`check_card`).

Optional (the defaults here; override them in the class):
- `decode(latents)`: the previews' images; the teacher's VAE unless the method trains a decoder.
- `held_modules()`: frozen networks the step runs besides the teacher and the trained ones (reward models): what
  the planner counts.
- `check_engine(engine)`: what the method cannot run under a distributed engine, refused in one line by training
  and by the planner alike.
- `MEMORY_SAVERS`: what `plan.fit` may turn on when a step does not fit, cheapest first, as config overrides.
- `plan_stand_in(node)` and `plan_note(node)` (static): what a memory plan builds instead of this config node, and
  a line for its report (plan_config.py asks every configured object, methods included).

Shared pieces every method uses: `unwrap`, `prepare_networks`, `ema_or_self`; methods/common.py holds the rest
(trainable copies, EMA, accumulated updates, exports).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .. import deepspeed_engines
from ..errors import UserError

# A student card's keys: what students.py, evaluation/ (rows, columns), model_card.py and merge_lora.py read.
CARD_KEYS = {
    "method": "the method's name: the label of evaluation rows and of the model card",
    "num_inference_steps": "the default step count of the exported pipeline",
    "guidance_scale": "the CFG scale it samples with (1: none)",
    "scheduler": "the diffusers scheduler class of export/scheduler/",
    "eval_steps": "the step counts it is evaluated at",
}
OPTIONAL_CARD_KEYS = {
    "timesteps": "fixed timesteps it samples at (one per step: DMD, DMD2)",
    "t_bar": "DMD's start timestep T̄ (an evaluation column)",
    "original_inference_steps": "the training grid its step counts must fit (LCM)",
    "timestep_scaling": "LCMScheduler's boundary-condition scaling",
    "lora": "the folder of its peft adapter inside the export",
    "lora_rank": "that adapter's rank", "lora_alpha": "that adapter's alpha",
    "objective_models": "pretrained models its training objective read (a reward's), name -> weights identity: a "
                        "board marks the figures computed with one of them not independent",
}
# Written by common.export_pipeline, not by the method.
EXPORT_CARD_KEYS = ("full_pipeline", "teacher", "resolution", "pipeline")


def check_card(card: dict) -> None:
    """A student card a method is about to export: every key of `CARD_KEYS`, and step counts that agree. Keys beyond
    the lists are the method's own figures (a reward's weight, say) and pass."""
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise ValueError(f"the {card.get('method', 'method')}'s card lacks {', '.join(missing)} (methods/base.py: "
                         f"CARD_KEYS)")
    steps = card["num_inference_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"card num_inference_steps={steps!r}; an integer >= 1")
    if card.get("timesteps") is not None and len(card["timesteps"]) != steps:
        raise ValueError(f"card timesteps={card['timesteps']} for num_inference_steps={steps}")
    if not card["eval_steps"] or not all(isinstance(s, int) and s >= 1 for s in card["eval_steps"]):
        raise ValueError(f"card eval_steps={card['eval_steps']!r}; a list of step counts")


class Method:
    """The base of every method: the optional hooks' defaults and the pieces each method shares (see the module)."""

    MEMORY_SAVERS: dict[str, dict] = {}
    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    teacher = None
    accelerator = None  # set by `prepare`

    # ---- required ------------------------------------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def prepare(self, accelerator) -> None:
        raise NotImplementedError

    def train_step(self, batch: dict, draws, micro_batches: int = 1) -> dict:
        raise NotImplementedError

    def sample(self, embeds: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def export(self, out_dir: Path) -> Path:
        raise NotImplementedError

    # ---- optional ------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] for the previews: the teacher's VAE."""
        return self.teacher.decode(latents)

    def held_modules(self) -> list[torch.nn.Module]:
        """Frozen networks the step runs besides the teacher and the trained ones (for the planner): none."""
        return []

    def check_engine(self, engine: str) -> None:
        """Refuse, in one line, what the method cannot run under `engine` (distributed.engine_name: ddp, fsdp2,
        zero2, zero3): `prepare_networks` asks before training, the planner before a plan. Default: everything."""

    # ---- shared pieces -------------------------------------------------------------------------------------
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network inside what `prepare` wrapped it in (DDP, DeepSpeed's engine; FSDP2 shards in place)."""
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else model

    def prepare_networks(self, accelerator, grad_clip: float | None) -> None:
        """Every trained network with its optimizer, one `prepare` call each (FSDP2 takes one model per call,
        DeepSpeed makes an engine of each); the prepared network replaces the method's attribute of its name."""
        from ..distributed import engine_name

        self.check_optimizer_names()
        self.check_engine(engine_name(accelerator))
        self.accelerator = accelerator
        for name in list(self.models):
            self.models[name], self.optimizers[name] = deepspeed_engines.prepare(
                accelerator, self.models[name], self.optimizers[name], grad_clip)
            if hasattr(self, name):
                setattr(self, name, self.models[name])

    def check_optimizer_names(self) -> None:
        """Optimizer states are saved and restored by the name of their network: the names must match."""
        strays = sorted(set(self.optimizers) - set(self.models))
        if strays:
            raise UserError(f"{type(self).__name__}: optimizer '{strays[0]}' has no network of that name in "
                            f"method.models; name each optimizer after the network it trains (methods/base.py)")

    @staticmethod
    def ema_or_self(network: torch.nn.Module, ema=None):
        """`network` with its EMA weights swapped in for the duration, or as it is without an EMA (a context)."""
        return ema.applied(network) if ema is not None else contextlib.nullcontext(network)
