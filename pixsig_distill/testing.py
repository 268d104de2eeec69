"""Tiny random PixArt-Σ pipelines for unit tests: same classes as the real model, seconds on a CPU."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel

from .schedule import PIXART_SCHEDULER
from .tokenizer import build_t5_tokenizer

TINY_WORDS = "a an the red green blue circle square triangle on at top bottom left right center of background".split()

def tiny_pipeline(seed: int = 0, sample_size: int = 8, num_layers: int = 2) -> PixArtSigmaPipeline:
    """A 2-layer random PixArt-Σ with a random T5, a random VAE and a locally built tokenizer."""
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(TINY_WORDS)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, sample_size=sample_size * 2, scaling_factor=0.5)
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)


def put_in_hub_cache(folder, repo_id: str, cache_dir) -> None:
    """Lay a saved pipeline folder out as the hub cache does (refs/main → snapshots/<rev>), so that
    `from_pretrained(repo_id)` with HF_HUB_OFFLINE=1 runs the real hub code path without a network."""
    import shutil
    from pathlib import Path

    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
