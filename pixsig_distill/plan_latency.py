"""Generation latency and memory for the planner (`plan.gpu=`, `plan.inference=true`): the three calls of one image —
T5 over the prompt, transformer calls, the decode — run on fake tensors under torch's FLOP counter and memory
tracker, then a roofline per call. Every figure is a PREDICTION.

`plan.vae=tiny` decodes with `tiny_decoder_like(teacher.vae)` (pixsig_distill/decoders.py) instead of the VAE;
`plan.prompt_tokens=N` runs T5 and the transformer's cross-attention over N tokens (inference
`text_encoder.trim=true`: the batch's longest prompt) instead of the model's max_sequence_length padded tokens.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import UserError
from .fake_step import _Fakes, shape_only_teacher

INFER_MFU = 0.6
DECODERS = ("full", "tiny")
LEAN_PROMPT_TOKENS = 32  # about the T5 tokens of a long one-sentence caption (~25 words): the "lean" 1-step line
PART_LABELS = {"text_encoder": "T5", "transformer": "transformer", "vae": "VAE"}


def check_generation_options(options: DictConfig, model_cfg: DictConfig | None = None) -> None:
    """plan.vae and plan.prompt_tokens, refused in one line before any simulation."""
    if str(options.get("vae", "full")) not in DECODERS:
        raise UserError(f"plan.vae={options.vae!r}; use full (the model's VAE) or tiny (an AutoencoderTiny decoder "
                        f"built like pixsig_distill/decoders.py's tiny_decoder_like)")
    tokens = options.get("prompt_tokens")
    if tokens is None:
        return
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise UserError(f"plan.prompt_tokens={tokens!r}; give the T5 tokens of the longest prompt, e.g. "
                        f"plan.prompt_tokens=32 (null: the model's max_sequence_length, padded)")
    if model_cfg is not None:
        from .architectures import architecture_of

        longest = architecture_of(model_cfg.pretrained, model_cfg.get("max_sequence_length")).max_sequence_length
        if tokens > longest:
            raise UserError(f"plan.prompt_tokens={tokens} is more than this model's max_sequence_length={longest} "
                            f"(prompts are cut there); give at most {longest}")


def _choices(cfg: DictConfig, decoder: str | None, prompt_tokens: int | None) -> tuple[str, int | None]:
    """Explicit arguments, else the config's plan.vae / plan.prompt_tokens, else the full VAE over padded tokens."""
    decoder = str(decoder or OmegaConf.select(cfg, "plan.vae", default=None) or "full")
    if prompt_tokens is None:
        prompt_tokens = OmegaConf.select(cfg, "plan.prompt_tokens", default=None)
    return decoder, prompt_tokens


class _ActivationBytes(TorchDispatchMode):
    """Bytes an eager run moves besides the weights: every op that makes a tensor reads its non-weight inputs and
    writes its outputs once (no fusion, no cache reuse: at 1024 px one activation is 64-268 MB, above an H100's
    50 MB L2). `conv_bytes`: the convolutions' inputs and outputs alone (every other op fused into them)."""

    def __init__(self, weights: set[int]):
        super().__init__()
        self.weights, self.bytes, self.conv_bytes = weights, 0.0, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if outs and not func.is_view:
            size = lambda t: t.numel() * t.element_size()  # noqa: E731
            written = sum(size(t) for t in outs)
            read = sum(size(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor) and id(t) not in self.weights)
            self.bytes += read + written
            if func is torch.ops.aten.convolution.default:
                self.conv_bytes += size(args[0]) + written
        return out


@contextlib.contextmanager
def _generation_calls(cfg: DictConfig, transformer_batch: int = 1, decoder: str | None = None,
                      prompt_tokens: int | None = None):
    """The three calls of one image on fake tensors, as {part: (module, call)}: T5 over the prompt, one transformer
    call at `transformer_batch` (2 = the CFG batch), the decode ("vae": the VAE, or with decoder="tiny" the tiny
    decoder); run them inside the context. prompt_tokens: T5's and the cross-attention's length (None: padded)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .decoders import tiny_decoder_like

    decoder, prompt_tokens = _choices(cfg, decoder, prompt_tokens)
    with open_dict(cfg):
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.load_text_encoder = True
    teacher, arch = shape_only_teacher(model_cfg)
    if decoder == "tiny":
        with torch.device("meta"):
            decode_module = tiny_decoder_like(teacher.vae).to(teacher.dtype)
    else:
        decode_module = teacher.vae
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = _Fakes(mode)
    parts = {"text_encoder": teacher.pipe.text_encoder, "transformer": teacher.transformer, "vae": decode_module}
    for module in parts.values():
        fakes.module(module)
    batch, tokens = transformer_batch, int(prompt_tokens or arch.max_sequence_length)
    denoiser = teacher.denoiser  # over the fake weights
    with mode, torch.no_grad():
        latents = torch.empty(teacher.latent_shape(batch), dtype=teacher.dtype)
        embeds = torch.empty(batch, tokens, arch.transformer["caption_channels"], dtype=teacher.dtype)
        calls = {"text_encoder": lambda: parts["text_encoder"](torch.zeros(1, tokens, dtype=torch.long)),
                 "transformer": lambda: denoiser.eps(latents, torch.tensor([500]), embeds,
                                                     torch.ones(batch, tokens, dtype=torch.long)),
                 "vae": lambda: decode_module.decode(latents[:1])}
        yield {name: (parts[name], call) for name, call in calls.items()}


def _weight_bytes(module: torch.nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in module.parameters()))


def generation_flops(cfg: DictConfig, decoder: str | None = None, prompt_tokens: int | None = None) -> dict:
    """FLOPs and weight bytes of one image: T5 over the prompt, one transformer call, the decode (also its
    activation bytes: `_ActivationBytes`). decoder / prompt_tokens: as `_generation_calls` (default: cfg.plan's)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with _generation_calls(cfg, 1, decoder, prompt_tokens) as calls:
        for name, (module, call) in calls.items():
            counter = FlopCounterMode(display=False)
            traffic = _ActivationBytes({id(t) for t in [*module.parameters(), *module.buffers()]})
            with counter, (traffic if name == "vae" else contextlib.nullcontext()):
                call()
            out[name] = {"flops": float(counter.get_total_flops()), "weight_bytes": _weight_bytes(module)}
            if name == "vae":
                out[name].update(activation_bytes=traffic.bytes, activation_bytes_fused=traffic.conv_bytes)
    return out


def generation_memory(cfg: DictConfig, guided: bool = True, decoder: str | None = None,
                      prompt_tokens: int | None = None) -> dict:
    """Weight bytes and peak bytes of one call of each part at batch 1 (the transformer at the CFG batch of 2),
    on fake tensors under torch's memory tracker: what the inference modes below combine."""
    from .fake_step import _memory_tracker

    out = {}
    with _generation_calls(cfg, 2 if guided else 1, decoder, prompt_tokens) as calls:
        for name, (module, call) in calls.items():
            tracker = _memory_tracker()
            tracker.track_external(module)
            with tracker:
                call()
            peak = max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
            out[name] = {"weight_bytes": _weight_bytes(module), "peak_bytes": float(peak)}
    return out


# Bytes per T5 weight relative to bf16 once quantized (bitsandbytes keeps layer norms and the embedding in 16 bits;
# ignored here): the planner's assumption, not a measurement.
QUANTIZED_SHARE = {"none": 1.0, "8bit": 0.5, "4bit": 0.25}


def inference_memory(parts: dict) -> dict:
    """Predicted peak device memory of generation per inference mode, from `generation_memory`'s parts."""
    def with_t5(quantization):
        t5 = parts["text_encoder"]
        weights = t5["weight_bytes"] * QUANTIZED_SHARE[quantization]
        return weights, weights + (t5["peak_bytes"] - t5["weight_bytes"])

    tr, vae = parts["transformer"], parts["vae"]
    image_weights = tr["weight_bytes"] + vae["weight_bytes"]
    image_peak = image_weights + max(tr["peak_bytes"] - tr["weight_bytes"], vae["peak_bytes"] - vae["weight_bytes"])
    modes = {}
    for quantization in QUANTIZED_SHARE:
        t5_weights, t5_peak = with_t5(quantization)
        label = "" if quantization == "none" else f", T5 {quantization}"
        modes[f"all resident{label}"] = max(t5_peak + image_weights, t5_weights + image_peak)
        modes[f"text_encoder.release{label}"] = max(t5_peak, image_peak)
        modes[f"offload=model{label}"] = max(t5_peak, tr["peak_bytes"], vae["peak_bytes"])
    return modes


def _call_seconds(figures: dict, gpu, batch: int = 1) -> tuple[float, bool]:
    """One call: max(FLOPs / (peak·MFU), (weights + activation traffic) / bandwidth), and whether memory bound it."""
    compute = batch * figures["flops"] / (gpu.bf16_flops * INFER_MFU)
    memory = (figures["weight_bytes"] + batch * figures.get("activation_bytes", 0.0)) / gpu.bandwidth
    return max(compute, memory), memory > compute


def roofline_parts(parts: dict, gpu, steps: int, cfg_calls: int) -> dict:
    """Seconds of each part of one image: T5 once, `steps` transformer calls at batch `cfg_calls`, one decode."""
    counts = {"text_encoder": (1, 1), "transformer": (steps, cfg_calls), "vae": (1, 1)}
    return {name: n * _call_seconds(parts[name], gpu, batch)[0] for name, (n, batch) in counts.items()}


def roofline_latency(parts: dict, gpu, steps: int, cfg_calls: int) -> float:
    """Seconds for one image: each network call takes max(FLOPs / (peak·MFU), bytes / bandwidth)."""
    return sum(roofline_parts(parts, gpu, steps, cfg_calls).values())


def generation_report(cfg: DictConfig, gpu) -> dict:
    """The report's generation figures on `gpu`: 1 step and the teacher as configured (plan.vae, plan.prompt_tokens),
    each split per part, and — unless that already is it — 1 step with the tiny decoder over a trimmed prompt."""
    from .architectures import architecture_of

    decoder, tokens = _choices(cfg, None, None)
    padded = architecture_of(cfg.model.pretrained, cfg.model.get("max_sequence_length")).max_sequence_length
    parts = generation_flops(cfg, decoder, tokens)
    steps = int(cfg.model.get("num_inference_steps", 20))
    guided = 2 if float(cfg.model.get("guidance_scale", 1.0)) > 1 else 1
    one, teacher = roofline_parts(parts, gpu, 1, 1), roofline_parts(parts, gpu, steps, guided)
    out = {"latency_1_step_s": sum(one.values()), "latency_teacher_s": sum(teacher.values()),
           "teacher_steps": steps, "teacher_cfg_calls": guided, "infer_mfu": INFER_MFU, "parts": parts,
           "decoder": decoder, "prompt_tokens": tokens, "padded_tokens": padded, "latency_1_step_parts_s": one,
           "latency_teacher_parts_s": teacher,
           "memory_bound": [name for name in parts if _call_seconds(parts[name], gpu)[1]]}
    if decoder != "tiny" or tokens is None:
        lean_tokens = tokens or min(LEAN_PROMPT_TOKENS, padded)
        lean = generation_flops(cfg, "tiny", lean_tokens)
        lean_one = roofline_parts(lean, gpu, 1, 1)
        out["lean_1_step"] = {"decoder": "tiny", "prompt_tokens": lean_tokens, "parts": lean,
                              "latency_1_step_s": sum(lean_one.values()), "latency_1_step_parts_s": lean_one,
                              "memory_bound": [name for name in lean if _call_seconds(lean[name], gpu)[1]]}
    return out


def _breakdown(seconds: dict, decoder: str, memory_bound: list) -> str:
    labels = {**PART_LABELS, "vae": "tiny decoder" if decoder == "tiny" else "VAE"}
    return " + ".join(f"{labels[name]} {1000 * s:.1f}{'*' if name in memory_bound else ''}"
                      for name, s in seconds.items())


def format_generation(g: dict) -> list[str]:
    """The report's generation lines (a PREDICTION): per part in ms; * marks a part bound by memory traffic."""
    tokens = (f"T5 over {g['prompt_tokens']} prompt tokens" if g.get("prompt_tokens") else
              f"T5 over {g.get('padded_tokens', 'the')} padded tokens")
    decoder = "tiny decoder" if g.get("decoder") == "tiny" else "VAE decode"
    lines = [f"  generation (roofline PREDICTION, {g['infer_mfu']:.0%} MFU, bf16, batch 1, {tokens}, {decoder}; ms "
             f"per part, * = bound by memory traffic, not FLOPs):",
             f"    1 step ≈ {1000 * g['latency_1_step_s']:.0f} ms = "
             f"{_breakdown(g['latency_1_step_parts_s'], g.get('decoder'), g['memory_bound'])}",
             f"    teacher {g['teacher_steps']} steps × {g['teacher_cfg_calls']} calls ≈ "
             f"{1000 * g['latency_teacher_s']:.0f} ms = "
             f"{_breakdown(g['latency_teacher_parts_s'], g.get('decoder'), g['memory_bound'])}"]
    if "lean_1_step" in g:
        lean = g["lean_1_step"]
        lines.append(f"    1 step with the tiny decoder and {lean['prompt_tokens']}-token prompts ≈ "
                     f"{1000 * lean['latency_1_step_s']:.0f} ms = "
                     f"{_breakdown(lean['latency_1_step_parts_s'], 'tiny', lean['memory_bound'])} "
                     f"(plan.vae=tiny plan.prompt_tokens={lean['prompt_tokens']}; a tiny decoder is trained by "
                     f"distill=tiny_decoder)")
    decode = g.get("lean_1_step", g)["parts"]["vae"]
    unfused, fused = decode["activation_bytes"] / 1e9, decode["activation_bytes_fused"] / 1e9
    lines.append(f"    roofline limits: no kernel-launch, scheduler or Python time; a part at few tokens (T5 over a "
                 f"short prompt) is bound by reading its weights; activation traffic is counted for the decode only, "
                 f"every op unfused as eager PyTorch runs it (the tiny decoder: {unfused:.1f} GB, {fused:.1f} GB if "
                 f"all but its convolutions were fused)")
    return lines
