"""Jacobian-vector products of a PixArt transformer call in (x_t, t̂), for continuous-time consistency (sCM).

sCM's training target needs the total derivative of the student's output along the teacher's ODE,
dF/dt̂ = ∂F/∂x_t · dx_t/dt̂ + ∂F/∂t̂: one JVP of the network with the tangent (dx_t/dt̂, 1) (sCM §4, Alg. 1).
Two ways to get it, with one call signature (`jvp(fn, primals, tangents) → tangent of fn's output`):

- `ExactJVP`: forward-mode AD (`torch.func.jvp`). PyTorch's fused attention kernels have no forward-mode rule (the
  CPU flash kernel and the GPU flash and memory-efficient kernels), so for the call every attention layer runs
  diffusers' `AttnProcessor` (plain matmul and softmax, the same function) and gets its own processor back after.
  A processor that cannot be swapped that way is refused in one line (`check_forward_ad`).
- `FiniteDifferenceJVP`: the same directional derivative from network calls only, stepping every input along the
  same tangent, e.g. central: (fn(p + h·v) − fn(p − h·v)) / 2h. Any attention kernel, no tangent memory.

How time enters: PixArt's embedding takes the DDPM timestep t (0…999) in a sinusoid whose fastest component turns
one radian per timestep. With TrigFlow time the call is fn(x_t, t̂) = network(x_t, t(t̂)) (`pixart_call`, the
denoiser's `in_trigflow_time`), so a tangent in t̂ reaches the embedding multiplied by dt/dt̂ (chain rule,
`denoiser.ddpm_time_rate`: 167 at t = 0, 503 at T̄ = 400, 15,583 at t = 999). Both methods apply it, because the
mapping is inside fn: forward-mode AD differentiates through it, and a finite difference steps t̂ itself. A caller
that feeds DDPM timesteps directly must scale the time tangent by dt/dt̂ itself.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

from .errors import UserError

# Processors that compute exactly what AttnProcessor computes, with kernels that lack forward-mode AD.
SWAPPABLE = (AttnProcessor2_0, XFormersAttnProcessor)


def pixart_call(denoiser, embeds: torch.Tensor, mask: torch.Tensor,
                transformer=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """fn(x_t, t̂) → the network's first C output channels (ε̂ for the teacher, F for a v-prediction student) at the
    continuous DDPM timestep t(t̂), for one batch of text (`denoiser.Denoiser.in_trigflow_time`)."""
    return denoiser.in_trigflow_time(embeds, mask, transformer)


def _attention_layers(networks: Sequence[torch.nn.Module]):
    for network in networks:
        for name, module in network.named_modules():
            if isinstance(module, Attention):
                yield name, module


def check_forward_ad(*networks: torch.nn.Module) -> None:
    """Refuse, in one line, a network with an attention processor that neither has forward-mode AD nor can be
    swapped for diffusers' AttnProcessor without changing what it computes (e.g. IP-adapter, fused QKV)."""
    for name, attention in _attention_layers(networks):
        processor = attention.processor
        if type(processor) is not AttnProcessor and type(processor) not in SWAPPABLE:
            raise UserError(f"attention layer '{name}' runs {type(processor).__name__}, which has no forward-mode AD "
                            f"and is not diffusers' plain attention; use distill.jvp=finite_difference, or give the "
                            f"model diffusers' AttnProcessor or AttnProcessor2_0 (set_attn_processor)")


@contextlib.contextmanager
def forward_ad_attention(*networks: torch.nn.Module):
    """Every attention layer of `networks` runs diffusers' AttnProcessor inside the block, its own processor after
    (the regular forward and backward keep the fused kernels)."""
    check_forward_ad(*networks)
    kept = [(attention, attention.processor) for _, attention in _attention_layers(networks)
            if type(attention.processor) is not AttnProcessor]
    math = AttnProcessor()
    try:
        for attention, _ in kept:
            attention.set_processor(math)
        yield
    finally:
        for attention, processor in kept:
            attention.set_processor(processor)


class ExactJVP:
    """Forward-mode AD: the exact directional derivative, at about twice the forward pass's live memory (a tangent
    beside every activation) and roughly 1.5–3× its time, on the math attention path."""

    def check(self, *networks: torch.nn.Module) -> None:
        check_forward_ad(*networks)

    def __call__(self, fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor],
                 tangents: Sequence[torch.Tensor], networks: Sequence[torch.nn.Module] = ()) -> torch.Tensor:
        """The tangent of fn's output at `primals` along `tangents` (no graph: sCM's target is stop-gradient).

        Dual tensors (torch.autograd.forward_ad) rather than torch.func.jvp: the same forward-mode AD on plain
        tensors, which the planner's fake tensors and memory tracker can follow (functorch's wrappers hide their
        storage from it)."""
        with torch.no_grad(), forward_ad_attention(*networks), fwAD.dual_level():
            duals = [fwAD.make_dual(p, v.to(p.dtype)) for p, v in zip(primals, tangents)]  # matching dtypes
            return fwAD.unpack_dual(fn(*duals)).tangent


class FiniteDifferenceJVP:
    """The same directional derivative from plain network calls: every input steps along its own tangent by `step`
    (units of the tangent; a step in t̂ of step × the time tangent).

    `scheme="central"` (scm.yaml's default): (fn(p + h·v) − fn(p − h·v)) / 2h, truncation error O(h²), two
    extra calls. `scheme="backward"`: (fn(p) − fn(p − h·v)) / h, error O(h), one extra call when fn(p) is passed as
    `value` (sCM does not pass it: its fn(p) is the student with gradients, this one without), and it never steps past the noisiest time it is given. Central is the default because
    its O(h²) error allows a step large enough to stay clear of float32 rounding: diffusers casts the timestep to
    float32 before its sinusoid, one ulp at t ≈ 999 is 6e-5 timesteps. On the toy teacher, along sCM's tangent
    cos t̂ sin t̂·(v, 1), h = 3e-4 is within 0.25 % of the exact JVP from t = 100 to 999, 1e-4 is 6 % off at t = 999
    and the backward scheme is 4–10× worse (docs/consistency.md, "JVP through PixArt-Σ"). Needs a float32 network:
    in bfloat16 the rounding swamps any useful step.

    A large step is a low-pass on purpose: along sCM's tangent a step of 0.05 spans ±5–8 DDPM timesteps at every
    noise level, wider than the wiggles the time embedding's fastest sinusoids put between neighbouring timesteps;
    sCM's targets then follow the network's trend in time, not those wiggles (distill=scm's default; measured in
    docs/consistency.md)."""

    def __init__(self, step: float, scheme: str):  # distill.jvp_step / jvp_scheme (conf/distill/scm.yaml)
        if not step > 0:
            raise UserError(f"distill.jvp_step={step} must be positive (0.05: the smoothed tangent; 3e-4: the exact "
                            f"one)")
        if scheme not in ("central", "backward"):
            raise UserError(f"distill.jvp_scheme={scheme!r} is not a scheme; use central or backward")
        self.step, self.scheme = float(step), scheme

    def check(self, *networks: torch.nn.Module) -> None:
        """Any attention kernel will do."""

    def __call__(self, fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor],
                 tangents: Sequence[torch.Tensor], networks: Sequence[torch.nn.Module] = (),
                 value: torch.Tensor | None = None) -> torch.Tensor:
        h = self.step

        def shifted(sign: float) -> torch.Tensor:
            return fn(*(p + sign * h * v.to(p.dtype) for p, v in zip(primals, tangents)))

        with torch.no_grad():
            if self.scheme == "central":
                return (shifted(+1.0) - shifted(-1.0)) / (2 * h)
            here = fn(*primals) if value is None else value
            return (here - shifted(-1.0)) / h
