"""The toy teacher's parts, in the real PixArt-Σ classes at toy size.

Images are 32×32 RGB; a small `AutoencoderKL` (factor 4, 4 latent channels, like the SDXL VAE's
channel count) gives 8×8×4 latents; a `PixArtTransformer2DModel` with patch 2 sees 16 tokens and
predicts ε plus learned-σ channels (out_channels = 8) as the real one; a small `T5EncoderModel`
reads captions through a word-level T5 tokenizer built from the world's vocabulary.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel

from ..schedule import PIXART_SCHEDULER
from ..tokenizer import build_t5_tokenizer
from .world import caption_vocabulary

RESOLUTION = 32
MAX_TOKENS = 16  # the longest caption is 12 words + </s>
T5_DIM = 64


def toy_tokenizer():
    return build_t5_tokenizer(caption_vocabulary(), model_max_length=MAX_TOKENS)


def toy_text_encoder(vocab_size: int, seed: int = 0) -> T5EncoderModel:
    """A 2-layer T5 encoder. It stays at its seeded random init: the caption language is a closed
    28-word vocabulary, so a fixed random encoder already gives every caption a distinct, position-aware
    embedding, and the transformer learns to read it (as PixArt reads a frozen T5)."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=16, dropout_rate=0.0, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def toy_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    # No mid-block attention: at 8×8 latents convolutions see the whole image anyway, and it is 2× faster.
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION,
                         mid_block_add_attention=False, scaling_factor=1.0)


def toy_transformer(seed: int = 0, num_layers: int = 8, heads: int = 6, head_dim: int = 32) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=RESOLUTION // 4, num_layers=num_layers, patch_size=2, attention_head_dim=head_dim,
        num_attention_heads=heads, caption_channels=T5_DIM, in_channels=4, out_channels=8,
        cross_attention_dim=heads * head_dim, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        interpolation_scale=1)


def toy_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
