"""How a model runs at inference: the low-memory and speed modes of the PixArt-Σ pipeline documentation.

One place for `generate`, the leaderboard's generation and `scripts/benchmark.py` (config group
`conf/inference/`, keys at the top level of those commands):

* `text_encoder.quantization=8bit|4bit`: T5 loaded through bitsandbytes (extra `.[8bit]`, CUDA);
* `text_encoder.release=true`: encode every prompt of the job first, free T5, then run the transformer and
  the VAE — the documentation's "under 8 GB" recipe, batched over a prompt file;
* `offload=model|sequential`: diffusers' CPU offload hooks (`enable_model_cpu_offload`,
  `enable_sequential_cpu_offload`; they need an accelerator device);
* `compile=true` (`compile_mode=`): torch.compile of the transformer, in place;
* `dtype=`: the weights' dtype;
* `text_encoder.trim=true` (the default): T5 over the batch's longest prompt instead of `max_sequence_length`
  padded tokens — the padding is masked, so the images stay the same;
* `vae=PATH`: a tiny decoder (`distill=tiny_decoder`'s export, diffusers `AutoencoderTiny`) instead of the VAE.

With quantization off and the model's own VAE none of them changes an image beyond the dtype's rounding
(tests/test_inference.py); a tiny decoder approximates the VAE (the leaderboard compares the two image for image).
"""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass

import torch

from .errors import UserError

QUANTIZATION = ("none", "8bit", "4bit")
OFFLOAD = ("none", "model", "sequential")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class InferenceMode:
    dtype: str | None = None
    compile: bool = False
    compile_mode: str = "default"
    offload: str = "none"
    quantization: str = "none"          # of the text encoder
    release_text_encoder: bool = False
    trim_text: bool = True              # T5 over the longest prompt of the batch
    vae: str | None = None              # a tiny decoder folder instead of the model's VAE

    @classmethod
    def from_config(cls, cfg) -> "InferenceMode":
        """From a command's config: `dtype`, `compile`, `compile_mode`, `offload`, `text_encoder.*`."""
        text_encoder = cfg.get("text_encoder") or {}
        mode = cls(dtype=cfg.get("dtype"), compile=cfg.get("compile", False),
                   compile_mode=str(cfg.get("compile_mode", "default")), offload=str(cfg.get("offload", "none")),
                   quantization=str(text_encoder.get("quantization", "none")),
                   release_text_encoder=text_encoder.get("release", False),
                   trim_text=text_encoder.get("trim", True), vae=cfg.get("vae"))
        mode.check()
        return mode

    def check(self) -> None:
        if not isinstance(self.compile, bool):
            raise UserError(f"compile={self.compile!r}; use true or false (compile_mode= picks the torch.compile mode)")
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"compile_mode={self.compile_mode!r}; use one of {', '.join(COMPILE_MODES)}")
        if self.offload not in OFFLOAD:
            raise UserError(f"offload={self.offload!r}; use none, model or sequential")
        if self.quantization not in QUANTIZATION:
            raise UserError(f"text_encoder.quantization={self.quantization!r}; use none, 8bit or 4bit")
        if not isinstance(self.release_text_encoder, bool):
            raise UserError(f"text_encoder.release={self.release_text_encoder!r}; use true or false")
        if not isinstance(self.trim_text, bool):
            raise UserError(f"text_encoder.trim={self.trim_text!r}; use true or false")
        if self.offload != "none" and not torch.cuda.is_available():
            raise UserError(f"offload={self.offload} moves each model to the GPU when it runs and back after; this "
                            f"machine has no GPU (on the CPU everything already sits in main memory): use offload=none")
        if self.quantization != "none":
            if importlib.util.find_spec("bitsandbytes") is None:
                raise UserError(f"text_encoder.quantization={self.quantization} needs bitsandbytes: "
                                f"pip install -e '.[8bit]'")
            if not torch.cuda.is_available():
                raise UserError(f"text_encoder.quantization={self.quantization}: bitsandbytes' 8-/4-bit T5 runs on "
                                f"CUDA here; this machine has no GPU: use text_encoder.quantization=none")

    # ---- loading --------------------------------------------------------------------------------------
    def text_encoder_quantization(self):
        """The transformers quantization config for T5, or None."""
        if self.quantization == "none":
            return None
        from transformers import BitsAndBytesConfig

        if self.quantization == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)

    def apply(self, model, vae: str | None = None) -> None:
        """The decoder (`vae`, else this mode's), trimmed prompts, offload hooks and compilation on a loaded
        `Teacher`-shaped model (teacher or student)."""
        from .decoders import use_decoder

        model.trim_text = self.trim_text
        if vae or self.vae:
            use_decoder(model, vae or self.vae)
        if self.offload != "none":
            model.enable_cpu_offload(sequential=self.offload == "sequential")
        if self.compile:
            model.transformer.compile(mode=self.compile_mode)  # in place: the module keeps its class and config

    def describe(self, model) -> str:
        """What the latency line says about how the images were made."""
        parts = [str(model.dtype).replace("torch.", ""), f"compile={self.compile_mode}" if self.compile else "eager",
                 f"offload={self.offload}"]
        parts.append(f"T5 {self.quantization}" if self.quantization != "none" else "T5 full precision")
        if self.release_text_encoder:
            parts.append("T5 released after encoding")
        parts.append("prompts trimmed to the longest" if self.trim_text else "prompts padded")
        if type(model.vae).__name__ != "AutoencoderKL":
            parts.append(f"decoder {type(model.vae).__name__}")
        return ", ".join(parts)


def load_for_inference(model_cfg, student=None, device: str = "auto", mode: InferenceMode | None = None,
                       pretrained: str | None = None, prompts: list[str] | None = None, vae: str | None = None):
    """(model, SamplerSpec): the teacher of `model_cfg` (another teacher folder with `pretrained`) or the student
    export `student`, loaded and set up as `mode` says.

    With text_encoder.release, `prompts` (and the empty prompt, for CFG) are encoded by T5 loaded alone, T5 is
    freed, and only then are the transformer and the VAE loaded: the PixArt-Σ documentation's low-memory order.
    The model answers those prompts from its cache (`add_prompts` encodes more the same way)."""
    from omegaconf import OmegaConf

    from .config import build
    from .students import load_student, teacher_spec

    mode = mode or InferenceMode()
    release = mode.release_text_encoder
    source = _text_source(model_cfg, student, pretrained)
    encoded = encode_alone(source, [*(prompts or []), ""], model_cfg, device, mode) if release else None
    quantization = None if release else mode.text_encoder_quantization()
    extra = {"text_encoder_quantization": quantization} if quantization is not None else {}
    if student is not None:
        model, spec = load_student(student, OmegaConf.to_container(model_cfg, resolve=True), device=device,
                                   dtype=mode.dtype, load_text_encoder=not release, **extra)
    else:
        overrides = {"device": device, **({"torch_dtype": mode.dtype} if mode.dtype else {}), **extra}
        if pretrained is not None:
            overrides["pretrained"] = pretrained
        if release:
            overrides["load_text_encoder"] = False
        model = build(model_cfg, **overrides)
        spec = teacher_spec(model)
    if encoded is not None:
        _remember(model, encoded)
    model.text_source = source  # add_prompts encodes further prompts from there
    mode.apply(model, vae)  # `vae`: this model's decoder (a leaderboard row's), over the mode's
    return model, spec


def add_prompts(model, prompts: list[str], model_cfg, device: str, mode: InferenceMode) -> None:
    """Prompts a model without T5 (text_encoder.release) has not seen: encoded by T5 loaded alone, then freed."""
    missing = [p for p in dict.fromkeys(prompts) if not model.can_encode([p])]
    if missing:
        _remember(model, encode_alone(model.text_source, missing, model_cfg, device, mode), null=False)


def encode_alone(source: str, prompts: list[str], model_cfg, device: str, mode: InferenceMode) -> dict:
    """prompt → (T5 embedding, mask), with T5 and its tokenizer loaded alone from `source` and freed after. Each is
    kept at max_sequence_length tokens (a job's prompts are cached once, whatever batch they later share); with
    text_encoder.trim the model cuts a batch of them to its longest prompt when they are read back."""
    from .teacher import load_pipeline, resolve_device, resolve_dtype

    dtype = resolve_dtype(mode.dtype or model_cfg.get("torch_dtype", "float32"))
    pipe = load_pipeline(source, torch_dtype=dtype, text_encoder_quantization=mode.text_encoder_quantization(),
                         text_only=True)
    target = resolve_device(device)
    if mode.quantization == "none":
        pipe.to(target)
    out, unique = {}, list(dict.fromkeys(prompts))
    with torch.no_grad():
        for start in range(0, len(unique), 32):
            chunk = unique[start:start + 32]
            embeds, mask, _, _ = pipe.encode_prompt(chunk, do_classifier_free_guidance=False, device=target,
                                                    clean_caption=False,
                                                    max_sequence_length=model_cfg.get("max_sequence_length", 300))
            out.update({p: (e.to(dtype), m) for p, e, m in zip(chunk, embeds, mask)})
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _remember(model, encoded: dict, null: bool = True) -> None:
    prompts = [p for p in encoded if p != "" or not null]
    if prompts:
        model.add_prompt_embeddings(prompts, torch.stack([encoded[p][0] for p in prompts]),
                                    torch.stack([encoded[p][1] for p in prompts]))
    if null:
        embeds, mask = encoded[""]
        model.set_null_embedding(embeds[None].to(model.device, model.dtype), mask[None].to(model.device))


def _text_source(model_cfg, student, pretrained) -> str:
    """Where T5 comes from: a full student export has its own, a transformer-only one borrows the teacher's."""
    if student is not None:
        from .students import read_card

        if read_card(student).get("full_pipeline"):
            return str(student)
    return str(pretrained or model_cfg.pretrained)
