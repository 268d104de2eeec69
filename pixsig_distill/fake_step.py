"""One training step on fake tensors: the machinery behind `python -m pixsig_distill.plan`.

The method of a config is built on the meta device (no weights are read), every tensor becomes a fake one
(`FakeTensorMode`: shapes and dtypes, no storage) and complete training steps run under torch's memory
tracker and FLOP counter. `predict_step` extrapolates two small depths to the real one.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig

from .config import build
from .plan_config import plannable

log = logging.getLogger(__name__)

@dataclass
class StepFigures:
    """One simulated training step (the second: optimizer state exists), in bytes / FLOPs."""

    params: float
    grads: float
    optimizer: float
    activations: float
    other: float          # tensors held outside modules and optimizers: the EMA, the batch
    peak: float
    flops: float

    def __sub__(self, other):
        return StepFigures(*(a - b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def __add__(self, other):
        return StepFigures(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def scaled(self, k: float):
        return StepFigures(*(a * k for a in asdict(self).values()))


# ---- networks without weights ------------------------------------------------------------------

def shape_only_teacher(model_cfg: DictConfig, num_layers: int | None = None):
    """The teacher as the config describes it, built on the meta device: no weights are read or allocated."""
    from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from .architectures import architecture_of
    from .teacher import Teacher, resolve_dtype
    from .schedule import PIXART_SCHEDULER
    from diffusers import DPMSolverMultistepScheduler

    import diffusers

    diffusers.logging.set_verbosity_error()  # casting weightless models: its float32-modules advice does not apply
    arch = architecture_of(model_cfg.pretrained, model_cfg.get("max_sequence_length"))
    dtype = resolve_dtype(model_cfg.get("torch_dtype", "float32"))
    transformer_cfg = dict(arch.transformer)
    if num_layers is not None:
        transformer_cfg["num_layers"] = num_layers
    with torch.device("meta"):
        transformer = PixArtTransformer2DModel.from_config(transformer_cfg).to(dtype)
        vae = AutoencoderKL.from_config(arch.vae).to(dtype)
        text_encoder = (T5EncoderModel(T5Config(**{"decoder_start_token_id": 0, **arch.text_encoder})).to(dtype)
                        if model_cfg.get("load_text_encoder", True) else None)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER))
    kwargs = {k: model_cfg[k] for k in ("max_sequence_length", "guidance_scale", "num_inference_steps")
              if k in model_cfg}
    return Teacher(pipe, device="meta", **kwargs), arch


class _Fakes:
    """Meta tensors → fake CPU tensors of the same shape, dtype and sharing (a tensor shared by two modules stays
    one tensor), so that code written for real tensors runs on them."""

    def __init__(self, mode):
        self.mode = mode
        self.memo: dict[int, torch.Tensor] = {}

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return t
        if id(t) not in self.memo:
            with self.mode:
                fake = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            if isinstance(t, torch.nn.Parameter):
                fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad)
            self.memo[id(t)] = fake
        return self.memo[id(t)]

    def module(self, root: torch.nn.Module) -> None:
        for module in root.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None:
                        store[name] = self.tensor(t)
            for name, value in vars(module).items():  # e.g. the EMA's shadow dict
                if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                    setattr(module, name, {k: self.tensor(v) for k, v in value.items()})

    def attributes(self, obj) -> None:
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                setattr(obj, name, self.tensor(value))

    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["params"] = [self.tensor(p) for p in group["params"]]


@contextlib.contextmanager
def _replacing_module_conversions():
    """`module.to(...)` swaps each parameter in place, which fake tensors refuse (they carry a weak reference);
    while planning, a conversion that changes nothing keeps the tensor and one that changes it replaces it."""
    original = torch.nn.Module._apply

    def _apply(module, fn, recurse=True):
        if recurse:
            for child in module.children():
                _apply(child, fn)
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is None:
                    continue
                with torch.no_grad():
                    applied = fn(t)
                if applied is not t:
                    store[key] = (torch.nn.Parameter(applied, requires_grad=t.requires_grad)
                                  if isinstance(t, torch.nn.Parameter) else applied)
        return module

    torch.nn.Module._apply = _apply
    try:
        yield
    finally:
        torch.nn.Module._apply = original


class _NoHook:
    def remove(self):
        pass


def _memory_tracker():
    """torch's MemTracker, for the step's peak only: it does not hook the gradients of frozen weights (the teacher,
    a LoRA base), which have none, accepts a network called several times in one step (DMD calls its generator
    and fake score repeatedly), and keeps no per-module peaks.

    It also keeps the peak of every *segment* of the step between events that do not depend on the depth (entering
    or leaving a module that is not a transformer block, an optimizer step). At two depths the segments pair up,
    and each segment's peak grows linearly with the depth, while the step's peak is the largest of them and can
    move from one segment to another as the depth grows (`predict_step`)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        segments: list
        ignored: set = set()  # ids of tensors that are not on the device (an EMA kept on the CPU)

        def _track(self, reftype, t):
            if id(t) not in self.ignored:
                super()._track(reftype, t)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for param in module.parameters():
                if not param.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(param, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state):
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)
                if self.segments and self.segments[-1]["Total"] < dev_snap["Total"]:
                    self.segments[-1] = dict(dev_snap)

        def _new_segment(self, module=None):
            name = self._mod_tracker.get_known_fqn(module) if module is not None else "optimizer"
            if name is None or "transformer_blocks." in name:
                return
            current = next(iter(self._curr_mem_snap.values()), None)
            self.segments.append(dict(current) if current else {"Total": 0})

        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents == {"Global"}:  # a root network called again: start its module statistics afresh
                    del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)
            self._new_segment(module)

        def _post_fw_hook(self, module, inputs, outputs):
            super()._post_fw_hook(module, inputs, outputs)
            self._new_segment(module)

        def _pre_bw_hook(self, module, args):
            super()._pre_bw_hook(module, args)
            self._new_segment(module)

        def _post_bw_hook(self, module, args):
            super()._post_bw_hook(module, args)
            self._new_segment(module)

        def __enter__(self):
            self.segments = []
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            self._step_hook = register_optimizer_step_pre_hook(
                lambda *_: self._new_segment())
            return super().__enter__()

        def __exit__(self, *args):
            self._step_hook.remove()
            return super().__exit__(*args)

    return Tracker()


def adamw_8bit_stand_in(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **_):
    """bitsandbytes' AdamW8bit holds both moments in uint8 with a float32 scale per 256 values: the same state
    sizes, allocated the same way, with a plain update (bitsandbytes needs CUDA, which the planner does not)."""
    return _StateSizedAdam(params, lr=lr, weight_decay=weight_decay)


class _StateSizedAdam(torch.optim.Optimizer):
    def __init__(self, params, lr, weight_decay):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    blocks = (p.numel() + 255) // 256
                    state["m"] = torch.empty(p.shape, dtype=torch.uint8, device=p.device)
                    state["v"] = torch.empty(p.shape, dtype=torch.uint8, device=p.device)
                    state["scales"] = torch.empty(2 * blocks, dtype=torch.float32, device=p.device)
                p.add_(p.grad, alpha=-group["lr"])


class BlankRealImages:
    """A real-image bank (`real_images.LatentBank`) whose rows are zeros of the right shapes, latents and a caption
    of the teacher's full token length: what a plan needs (made inside the fake mode, they are fake tensors too)
    and what its validation trains on (scripts/validate_plan.py), with no folder read or encoded."""

    def __init__(self, teacher):
        self.teacher = teacher

    def sample(self, batch_size: int, gen, device, dtype) -> tuple[torch.Tensor, ...]:
        length, width = self.teacher.max_sequence_length, self.teacher.transformer.config.caption_channels
        return (torch.zeros(self.teacher.latent_shape(batch_size), dtype=torch.float32).to(device),
                torch.zeros(batch_size, length, width, dtype=dtype).to(device),
                torch.ones(batch_size, length, dtype=torch.long).to(device))


def _fake_batch(cfg: DictConfig, teacher, arch, mode) -> dict:
    batch_size = cfg.train.batch_size * cfg.train.grad_accum
    width = arch.transformer["caption_channels"]
    with mode:
        batch = {"embeds": torch.empty(batch_size, arch.max_sequence_length, width, dtype=teacher.dtype),
                 "mask": torch.ones(batch_size, arch.max_sequence_length, dtype=torch.long),
                 "latents": torch.empty(teacher.latent_shape(batch_size), dtype=torch.float32),
                 "prompt": ["a prompt"] * batch_size}
        null = (torch.empty(1, arch.max_sequence_length, width, dtype=teacher.dtype),
                torch.ones(1, arch.max_sequence_length, dtype=torch.long))
    return batch, null


def simulate_step(cfg: DictConfig, num_layers: int | None = None, segments: list | None = None) -> StepFigures:
    """Build the method of `cfg` with `num_layers` transformer blocks on fake tensors, run one training step under
    the FLOP counter (it also creates the optimizer state) and a second under the memory tracker, whose peak is
    a step's as training runs it: with the optimizer state held. `segments`, if given, receives the figures at
    the peak of every segment of that step."""
    from accelerate import Accelerator
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    cfg = plannable(cfg)
    teacher, arch = shape_only_teacher(cfg.model, num_layers)
    method = build(cfg.distill, teacher=teacher)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = _Fakes(mode)
    modules = [m for m in (teacher.transformer, teacher.vae, teacher.pipe.text_encoder) if m is not None]
    modules += [*method.models.values(), *method.checkpoint_modules().values(), *_held(method)]
    for module in modules:
        fakes.module(module)
    for optimizer in method.optimizers.values():
        fakes.optimizer(optimizer)
    fakes.attributes(method)
    batch, null = _fake_batch(cfg, teacher, arch, mode)
    teacher.set_null_embedding(*null)
    # fp16 and bf16 take the same bytes; CPU autocast runs bf16.
    mixed = "bf16" if cfg.train.mixed_precision in ("bf16", "fp16") else "no"
    with _replacing_module_conversions():
        method.prepare(Accelerator(cpu=True, mixed_precision=mixed))
        modules = [m for m in (teacher.transformer, teacher.vae, teacher.pipe.text_encoder) if m is not None]
        modules += [*method.models.values(), *method.checkpoint_modules().values(), *_held(method)]
        # FLOPs in a step of their own: the FLOP counter keeps activations alive under checkpointing, which
        # would spoil the memory figures if it ran inside the tracker.
        counter = FlopCounterMode(display=False)
        with mode, counter:
            method.train_step(batch, torch.Generator().manual_seed(2), cfg.train.grad_accum)
        flops = float(counter.get_total_flops())
        del counter
        # Tracked from here: what the first step left (optimizer state, an EMA) counts as held from the start.
        tracker = _memory_tracker()
        held = {t: getattr(m, "on_cpu", False) for m in modules for k, v in vars(m).items()
                if isinstance(v, dict) and not k.startswith("_")  # not torch's own _parameters, _buffers
                for t in v.values() if isinstance(t, torch.Tensor)}  # e.g. the EMA's tensors
        tracker.ignored = {id(t) for t, on_cpu in held.items() if on_cpu}  # an EMA kept on the CPU
        held = [t for t, on_cpu in held.items() if not on_cpu]
        tracker.track_external(*modules, *method.optimizers.values(), *held, batch["embeds"], batch["latents"],
                               batch["mask"], *null)
        with mode, tracker:
            method.train_step(batch, torch.Generator().manual_seed(1), cfg.train.grad_accum)
    _forget_accelerate_state()  # the next simulation (plan.fit tries bf16, say) builds its own Accelerator
    if segments is not None:
        segments.extend(_figures(snapshot, flops) for snapshot in tracker.segments)
    peak = tracker.get_tracker_snapshot("peak")
    return _figures(peak[next(iter(peak))], flops)


def _forget_accelerate_state() -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with other settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _held(method) -> list:
    """The frozen networks a method's step runs besides the teacher (a reward model), if it names any."""
    return list(method.held_modules())


def _figures(snapshot: dict, flops: float) -> StepFigures:
    kinds = {str(k).split(".")[-1].lower(): v for k, v in snapshot.items()}
    return StepFigures(params=kinds.get("param", 0) + kinds.get("buffer", 0), grads=kinds.get("grad", 0),
                       optimizer=kinds.get("opt", 0), activations=kinds.get("act", 0) + kinds.get("temp", 0),
                       other=kinds.get("oth", 0), peak=kinds.get("total", 0), flops=flops)


def predict_step(cfg: DictConfig, depths=(1, 2), exact: bool = False,
                 segments: list | None = None) -> tuple[StepFigures, int]:
    """Figures of the full-depth step: simulated at every layer (`exact`) or extrapolated from two depths.
    `segments`, if given, receives the full-depth figures at the peak of every segment of the step (the step's
    peak is the largest): a sharded device's peak may fall in another segment (sharding.per_device)."""
    from .architectures import architecture_of

    layers = architecture_of(cfg.model.pretrained).transformer["num_layers"]
    if exact or layers <= max(depths):
        return simulate_step(cfg, None, segments=segments), layers
    low, high = sorted(depths)
    low_segments, high_segments = [], []
    at_low, at_high = simulate_step(cfg, low, segments=low_segments), simulate_step(cfg, high, segments=high_segments)

    def extrapolate(a: StepFigures, b: StepFigures) -> StepFigures:
        return a + (b - a).scaled((layers - low) / (high - low))

    if len(low_segments) != len(high_segments):  # should not happen; the step's peak alone then
        log.warning("the step's segments differ between depths %d and %d: extrapolating its peak alone", low, high)
        step = extrapolate(at_low, at_high)
        if segments is not None:
            segments.append(step)
        return step, layers
    # Each segment's peak is linear in the depth; the step's peak at full depth is the largest extrapolated one.
    full_depth = [extrapolate(a, b) for a, b in zip(low_segments, high_segments)]
    if segments is not None:
        segments.extend(full_depth)
    best = max(full_depth, key=lambda f: f.peak)
    best.flops = extrapolate(at_low, at_high).flops
    return best, layers
