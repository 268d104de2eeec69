"""The PixArt-Σ teacher: the stock diffusers pipeline plus the few calls distillation needs.

`Teacher` owns a `diffusers.PixArtSigmaPipeline` (T5 tokenizer + encoder, transformer, VAE,
scheduler) and adds: prompt encoding with the empty-prompt (null) embedding, the teacher's own sampler and
decoding. The network with its noise schedule (ε, x0, v, guidance, TrigFlow) is `teacher.denoiser`
(denoiser.py). Loading goes through `load_pipeline`, the one function used for hub ids and local folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import diffusers
import torch
from diffusers import PixArtSigmaPipeline

from .checkpoint import PICKLE_SUFFIXES
from .denoiser import Denoiser
from .errors import UserError
from .sampling import initial_noise, sample_latents
from .schedule import scheduler_like

PIPELINE_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; use one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N ({err})") from None


def _is_hub_id(name: str) -> bool:
    """'org/name' with no local meaning; anything else is treated as a folder path."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name))


def check_model_folder(folder: Path, components=PIPELINE_COMPONENTS) -> None:
    """Fail early, naming the missing part, before diffusers fails deep inside."""
    if not folder.is_dir():
        raise UserError(f"model folder '{folder}' does not exist; set model.pretrained to a diffusers pipeline "
                        f"folder or a hub id such as PixArt-alpha/PixArt-Sigma-XL-2-512-MS")
    missing = [name for name in ("model_index.json", *components) if not (folder / name).exists()]
    if missing:
        raise UserError(f"model folder '{folder}' lacks {', '.join(missing)}; it must be a diffusers pipeline folder "
                        f"(save one with PixArtSigmaPipeline.save_pretrained)")
    for name in components:
        if (folder / name).is_dir():
            refuse_pickle_weights(folder / name)


def refuse_pickle_weights(folder: Path) -> None:
    """Weights are read from safetensors only: a folder whose weights are pickles (`.bin`, `.pt`, ...) is refused
    before diffusers could fall back to unpickling them (unpickling runs whatever code the file names)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"'{folder}' holds pickle weights ({', '.join(pickles[:3])}) and no safetensors; pickles are "
                        f"never loaded (unpickling can run code): re-save the model with safe_serialization=True")


def refuse_few_step_student(pretrained: str) -> None:
    """A few-step student export given as the teacher: its own card says what it is (a fine-tune, which samples like a
    teacher, is welcome)."""
    import json

    from .model_card import STUDENT_CARD

    card_file = Path(os.path.expanduser(str(pretrained))) / STUDENT_CARD
    if not card_file.is_file():
        return
    card = json.loads(card_file.read_text())
    steps = int(card.get("num_inference_steps", 20))
    if steps <= 8 and float(card.get("guidance_scale", 1.0)) <= 1.0:
        raise UserError(f"model.pretrained={pretrained} is a {steps}-step {card.get('method', 'student')} student "
                        f"(its {STUDENT_CARD} says so), not a teacher; distil from the teacher it came from: "
                        f"model.pretrained={card.get('teacher') or 'THE_TEACHER'}")


def pipeline_class(transformer) -> type:
    """The stock diffusers pipeline that samples this transformer: PixArt-α 1024 needs `PixArtAlphaPipeline` (the
    only one that passes its size conditions); everything else loads in `PixArtSigmaPipeline`."""
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline if getattr(transformer, "use_additional_conditions", False) else PixArtSigmaPipeline


def source_folder(pipe) -> Path | None:
    """The folder the pipeline was loaded from (a local folder, or its snapshot in the hub cache), if any."""
    name = str(getattr(pipe, "name_or_path", "") or "")
    if not name:
        return None
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if _is_hub_id(name):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not in the cache (or no hub library): nothing to copy from
            return None
    return None


def load_pipeline(pretrained: str, transformer: str | None = None, torch_dtype: str | torch.dtype = "float32",
                  load_text_encoder: bool = True, text_encoder_quantization=None,
                  text_only: bool = False) -> PixArtSigmaPipeline:
    """Load a PixArt pipeline from a hub id or a local folder, exactly as diffusers does.

    `transformer` optionally replaces the transformer with one from another repo or folder (its
    `transformer/` subfolder), e.g. a distilled student on top of the teacher's T5 and VAE.
    With `load_text_encoder=False` the 4.7B T5 is skipped (training from cached embeddings);
    `text_encoder_quantization` (a transformers BitsAndBytesConfig, inference.py) loads it in 8 or 4 bits;
    `text_only` loads T5 and its tokenizer alone (prompts encoded before the rest is loaded).
    """
    dtype = resolve_dtype(torch_dtype)
    pretrained = str(os.path.expanduser(pretrained))
    components = PIPELINE_COMPONENTS if load_text_encoder else ("transformer", "vae", "scheduler")
    kwargs = {} if load_text_encoder else {"text_encoder": None, "tokenizer": None}
    if text_only:
        components, kwargs = ("text_encoder", "tokenizer"), {"transformer": None, "vae": None}
    if transformer is not None:
        kwargs["transformer"] = _load_transformer(transformer, dtype)
        components = tuple(c for c in components if c != "transformer")
    if not _is_hub_id(pretrained):
        check_model_folder(Path(pretrained), components)
    try:  # use_safetensors: never fall back to pickled .bin weights, local or from the hub
        if load_text_encoder and text_encoder_quantization is not None:
            from transformers import T5EncoderModel

            kwargs["text_encoder"] = T5EncoderModel.from_pretrained(
                pretrained, subfolder="text_encoder", quantization_config=text_encoder_quantization,
                torch_dtype=dtype, use_safetensors=True)
        return PixArtSigmaPipeline.from_pretrained(pretrained, torch_dtype=dtype, use_safetensors=True, **kwargs)
    except Exception as err:  # diffusers/hub errors are long; name the model and the fix in one line
        raise UserError(_load_error_message(pretrained, err)) from None


def _load_transformer(name: str, dtype: torch.dtype):
    from diffusers import PixArtTransformer2DModel

    name = str(os.path.expanduser(name))
    if not _is_hub_id(name):
        folder = Path(name)
        if (folder / "transformer").is_dir():
            folder = folder / "transformer"
        if not (folder / "config.json").exists():
            raise UserError(f"transformer folder '{name}' has no config.json; point it at a diffusers "
                            f"transformer folder or a pipeline folder with transformer/")
        refuse_pickle_weights(folder)
        name = str(folder)
        try:
            return PixArtTransformer2DModel.from_pretrained(name, torch_dtype=dtype, use_safetensors=True)
        except Exception as err:
            raise UserError(_load_error_message(name, err)) from None
    try:
        return PixArtTransformer2DModel.from_pretrained(name, subfolder="transformer", torch_dtype=dtype,
                                                        use_safetensors=True)
    except Exception as err:
        raise UserError(_load_error_message(name, err)) from None


def _load_error_message(name: str, err: Exception) -> str:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    if _is_hub_id(name):
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub could not be reached or has no such model"
        return (f"hub model '{name}' is not in the local cache and {why}; download it where there is internet "
                f"(huggingface-cli download {name}) or set model.pretrained=/path/to/local/folder ({first_line})")
    return f"could not load model '{name}': {first_line}; re-save or re-download the folder"


def fit_length(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (B, L, D) and masks (B, L) cut or zero-padded to `length` tokens. Only masked positions are cut
    or added, and masked positions do not reach the output: the transformer's cross-attention gives them no weight."""
    have = embeds.shape[1]
    if have >= length:
        if have > length and bool(mask[:, length:].any()):
            raise ValueError(f"cutting embeddings to {length} tokens would drop unmasked ones")
        return embeds[:, :length], mask[:, :length]
    pad = length - have
    return (torch.cat([embeds, embeds.new_zeros(embeds.shape[0], pad, embeds.shape[2])], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1))


class Teacher:
    """Frozen PixArt-Σ: prompts → embeddings, its own sampler, VAE decode; `denoiser`: the network and its schedule."""

    def __init__(self, pipe: PixArtSigmaPipeline, max_sequence_length: int = 300, guidance_scale: float = 4.5,
                 num_inference_steps: int = 20, scheduler: str | None = None, resolution: int | None = None,
                 device: str = "auto", trim_text: bool = False):
        self.pipe = pipe.to(resolve_device(device))
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
            if module is not None:
                module.requires_grad_(False).eval()
        if scheduler is not None:  # e.g. "DDIMScheduler": any diffusers scheduler class, same ᾱ schedule
            if not hasattr(diffusers, scheduler):
                raise UserError(f"unknown scheduler '{scheduler}'; use a diffusers scheduler class name "
                                f"such as DPMSolverMultistepScheduler or DDIMScheduler")
            pipe.scheduler = scheduler_like(getattr(diffusers, scheduler), pipe.scheduler.config)
        self.max_sequence_length = max_sequence_length
        # Inference (text_encoder.trim): T5 runs over the batch's longest prompt, not max_sequence_length padded
        # tokens. The padding is masked in T5 and in the transformer's cross-attention, so images do not change.
        self.trim_text = trim_text
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps
        self.vae_scale_factor = pipe.vae_scale_factor
        native = pipe.transformer.config.sample_size * self.vae_scale_factor
        if resolution is not None and resolution != native:
            raise UserError(f"model.resolution={resolution} but this transformer makes {native} px images (sample_size "
                            f"{pipe.transformer.config.sample_size}); set model.resolution={native} or null, or use "
                            f"the model config of that resolution")
        self.resolution = native
        self._offload_device = None  # the GPU the offload hooks run on (enable_cpu_offload)
        self._null = None
        self._known: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt → cached (embeds, mask), no T5

    @classmethod
    def from_pretrained(cls, pretrained: str, transformer: str | None = None, torch_dtype: str = "float32",
                        load_text_encoder: bool = True, text_encoder_quantization=None, **kwargs) -> "Teacher":
        refuse_few_step_student(pretrained)
        return cls(load_pipeline(pretrained, transformer, torch_dtype, load_text_encoder, text_encoder_quantization),
                   **kwargs)

    def enable_cpu_offload(self, sequential: bool = False) -> None:
        """diffusers' offload hooks: each model moves to the GPU when it runs (`sequential`: each layer)."""
        (self.pipe.enable_sequential_cpu_offload if sequential else self.pipe.enable_model_cpu_offload)()
        self._offload_device = self.pipe._execution_device

    # ---- components -------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        """Where inputs go: the transformer's device, or the GPU the offload hooks run it on."""
        return self._offload_device or self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def latent_channels(self) -> int:
        return self.pipe.transformer.config.in_channels

    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, int, int, int]:
        size = (resolution or self.resolution) // self.vae_scale_factor
        return (batch_size, self.latent_channels, size, size)

    # ---- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings (B, L, D) and attention masks (B, L) exactly as the pipeline computes them; with
        `trim_text`, L is the longest prompt's token count instead of `max_sequence_length`."""
        if self.pipe.text_encoder is None:
            if prompts and all(p in self._known for p in prompts):  # e.g. training previews from the text cache
                embeds = torch.stack([self._known[p][0] for p in prompts])
                mask = torch.stack([self._known[p][1] for p in prompts])
                return fit_length(embeds, mask, int(mask.sum(1).max())) if self.trim_text else (embeds, mask)
            raise UserError("this teacher was loaded without its text encoder; use cached embeddings "
                            "(data=cached) or load it with model.load_text_encoder=true")
        length = self.prompt_tokens(prompts) if self.trim_text else self.max_sequence_length
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device, clean_caption=False,
            max_sequence_length=length)
        return embeds.to(self.dtype), mask

    def prompt_tokens(self, prompts: list[str]) -> int:
        """T5 tokens of the longest prompt (end-of-sequence included, at most max_sequence_length), tokenized as
        the pipeline does (lower-cased, stripped): padding to it truncates nothing."""
        texts = self.pipe._text_preprocessing(list(prompts), clean_caption=False)
        ids = self.pipe.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_sequence_length,
                                  add_special_tokens=True, return_tensors="pt").input_ids
        return int(ids.shape[1])

    def add_prompt_embeddings(self, prompts: list[str], embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """Cached embeddings (B, L, D) of some prompts: `encode_prompts` answers them when T5 is not loaded."""
        for prompt, e, m in zip(prompts, embeds, mask):
            self._known[prompt] = (e.to(self.device, self.dtype), m.to(self.device))

    def can_encode(self, prompts: list[str]) -> bool:
        return self.pipe.text_encoder is not None or all(p in self._known for p in prompts)

    def set_null_embedding(self, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """Use a cached empty-prompt embedding (1, L, D) when T5 is not loaded."""
        self._null = (embeds, mask)

    def null_embedding(self, batch_size: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-prompt embedding used as the unconditional branch of CFG (cached), `length` tokens long
        (the conditional embeddings' length, which trimmed encoding varies) when given."""
        if self._null is None:
            self._null = self.encode_prompts([""])
        embeds, mask = self._null if length is None else fit_length(*self._null, length)
        return embeds.expand(batch_size, -1, -1), mask.expand(batch_size, -1)

    # ---- denoiser ----------------------------------------------------------------------------
    @property
    def denoiser(self) -> Denoiser:
        """The transformer with its noise schedule (ε, x0, v, guidance, TrigFlow: denoiser.py), over the pipeline's
        current components, with this teacher's empty prompt as the unconditional branch of guidance."""
        return Denoiser(self.pipe.transformer, self.pipe.scheduler.alphas_cumprod, self.vae_scale_factor,
                        self.null_embedding, self.device)

    # ---- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str] | None = None, embeds=None, mask=None, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, generator=None, noise=None, scheduler=None,
               timesteps: list[int] | None = None, progress: bool = False) -> torch.Tensor:
        """The teacher's own sampler (DPM-Solver++ 20 steps, CFG 4.5 by default) → latents.

        The same call samples a student loaded into a `Teacher` (its scheduler, its steps or timesteps)."""
        if embeds is None:
            embeds, mask = self.encode_prompts(prompts)
        if noise is None:
            noise = initial_noise(self.latent_shape(embeds.shape[0]), generator, self.device, self.dtype)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        null = self.null_embedding(embeds.shape[0], embeds.shape[1]) if scale > 1.0 else None
        denoiser = self.denoiser

        def eps_fn(x_t, t):
            return denoiser.guided_eps(x_t, t, embeds, mask, scale, null)

        steps = None if timesteps is not None else (num_inference_steps or self.num_inference_steps)
        return sample_latents(eps_fn, scheduler or self.scheduler, noise, steps, timesteps=timesteps,
                              generator=generator, progress=progress)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1], (B, 3, H, W), as the pipeline decodes them."""
        vae = self.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
