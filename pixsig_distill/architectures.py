"""The real PixArt architectures as configs, and random-weight pipelines built from them.

The planner (`plan.py`) needs the shapes of the real models without downloading them, and the tests and
benchmarks run the real widths (hidden 1152, 16 heads, caption channels 4096, 300 T5 tokens, the real VAE)
at reduced depth on a CPU. The configs below are those of the public diffusers checkpoints
(transformer/config.json, vae/config.json, text_encoder/config.json); a local folder's own config files
take precedence (`architecture_of`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# PixArt-Σ / -α XL/2: 28 blocks, 16 heads × 72 = 1152 hidden, patch 2, ε + learned σ out.
PIXART_XL2 = dict(num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
                  patch_size=2, caption_channels=4096, cross_attention_dim=1152, activation_fn="gelu-approximate",
                  num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                  norm_eps=1e-6, attention_bias=True, upcast_attention=False, dropout=0.0)
# The SDXL VAE (Σ) and the SD VAE (α) share one architecture; they differ in weights and scaling factor.
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              act_fn="silu", block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
# T5-v1.1-XXL encoder (4.7B): what PixArt encodes prompts with.
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False)


@dataclass
class Architecture:
    """What a PixArt pipeline is made of, by shape only."""

    transformer: dict
    vae: dict
    text_encoder: dict = field(default_factory=lambda: dict(T5_XXL))
    max_sequence_length: int = 300

    @property
    def resolution(self) -> int:
        return self.transformer["sample_size"] * 2 ** (len(self.vae["block_out_channels"]) - 1)


KNOWN = {
    "PixArt-alpha/PixArt-Sigma-XL-2-512-MS": Architecture(
        {**PIXART_XL2, "sample_size": 64, "interpolation_scale": 1, "use_additional_conditions": False},
        {**SD_VAE, "sample_size": 512, "scaling_factor": 0.13025}),
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": Architecture(
        {**PIXART_XL2, "sample_size": 128, "interpolation_scale": 2, "use_additional_conditions": False},
        {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}),
    "PixArt-alpha/PixArt-XL-2-512x512": Architecture(
        {**PIXART_XL2, "sample_size": 64, "interpolation_scale": 1}, {**SD_VAE, "sample_size": 512,
                                                                    "scaling_factor": 0.18215},
        max_sequence_length=120),
    "PixArt-alpha/PixArt-XL-2-1024-MS": Architecture(  # α 1024: size conditions on (sample_size 128)
        {**PIXART_XL2, "sample_size": 128, "interpolation_scale": 2}, {**SD_VAE, "sample_size": 1024,
                                                                     "scaling_factor": 0.18215},
        max_sequence_length=120),
}


def architecture_of(pretrained: str, max_sequence_length: int | None = None) -> Architecture:
    """The architecture behind `model.pretrained`: a local folder's (or hub cache's) configs, else a known id's."""
    from .teacher import _is_hub_id

    folder = Path(str(pretrained)).expanduser()
    if not folder.is_dir() and _is_hub_id(str(pretrained)):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(pretrained), local_files_only=True))
        except Exception:
            folder = None
    if folder is not None and (folder / "transformer" / "config.json").is_file():
        text = folder / "text_encoder" / "config.json"
        arch = Architecture(_read(folder / "transformer" / "config.json"), _read(folder / "vae" / "config.json"),
                            _read(text) if text.is_file() else dict(T5_XXL))
    elif str(pretrained) in KNOWN:
        arch = KNOWN[str(pretrained)]
    else:
        raise UserError(f"no architecture known for model.pretrained='{pretrained}': point it at a local diffusers "
                        f"folder, or use one of {', '.join(KNOWN)}")
    if max_sequence_length:
        arch = Architecture(arch.transformer, arch.vae, arch.text_encoder, max_sequence_length)
    return arch


def _read(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def random_pipeline(name: str, num_layers: int = 2, seed: int = 0, text_width_only: bool = True,
                    sample_size: int | None = None):
    """A random-weight pipeline of a known architecture at reduced depth (real widths, real VAE).

    `text_width_only`: a tiny random T5 whose output has the real width (4096) instead of the 4.7B encoder, with a
    locally built tokenizer (nothing is downloaded). `sample_size`: a smaller latent canvas than the checkpoint's
    (same widths, fewer image tokens), for runs that test the widths and not the resolution."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from .schedule import PIXART_SCHEDULER
    from .testing import TINY_WORDS
    from .tokenizer import build_t5_tokenizer

    arch = KNOWN[name]
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**{**arch.transformer, "num_layers": num_layers,
                                              "sample_size": sample_size or arch.transformer["sample_size"]})
    vae = AutoencoderKL(**arch.vae)
    tokenizer = build_t5_tokenizer(TINY_WORDS, model_max_length=arch.max_sequence_length)
    text_config = dict(arch.text_encoder)
    if text_width_only:
        text_config.update(d_kv=8, d_ff=16, num_layers=1, num_heads=2, relative_attention_num_buckets=8)
    text_config["vocab_size"] = len(tokenizer)
    text_encoder = T5EncoderModel(T5Config(**{"decoder_start_token_id": 0, **text_config}))
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER))
