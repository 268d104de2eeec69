"""Tiny decoders: diffusers' `AutoencoderTiny` (the TAESD architecture) in place of the teacher's VAE decoder.

After a one-step student the transformer runs once, and the VAE decode is the largest part of a generation (at
PixArt-Σ 1024 px the planner counts 9.9 TFLOP for the SDXL VAE decode against 4.3 for the transformer). A tiny
decoder distilled with `distill=tiny_decoder` (methods/tiny_decoder.py) takes the same latents.

Latent scaling: PixArt pipelines call `vae.decode(latents / vae.config.scaling_factor)`. The teacher's VAE wants
the unscaled latents; a tiny decoder is built with `scaling_factor=1.0` and trained on the latents exactly as the
transformer makes them, so `PixArtSigmaPipeline(..., vae=tiny)` decodes them right with no other change
(TAESD's own convention). Its upsampling count matches the VAE's, so `pipe.vae_scale_factor` stays the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError

TAESD_CHANNELS = 64           # TAESD / TAESDXL: 64 channels in every block
TAESD_BLOCKS = (3, 3, 3, 1)   # blocks per resolution, coarsest first (the last one at full resolution)


def tiny_decoder_like(vae, channels: int = TAESD_CHANNELS, blocks=TAESD_BLOCKS):
    """An untrained `AutoencoderTiny` that decodes `vae`'s latents: its latent channels, its upsampling count
    (`blocks` per resolution, coarsest first; a longer list keeps its last entries), and `scaling_factor=1.0` (it reads the scaled latents the transformer makes)."""
    from diffusers import AutoencoderTiny

    levels = len(vae.config.block_out_channels)
    blocks = tuple(int(b) for b in blocks)[-levels:]  # a 3-level toy VAE: the TAESD layout's last three
    if len(blocks) != levels:
        raise UserError(f"distill.decoder.blocks={list(blocks)} has {len(blocks)} resolutions; this VAE has {levels}: "
                        f"give {levels} block counts, coarsest first")
    widths = (int(channels),) * levels
    return AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=widths,
                           decoder_block_out_channels=widths, num_encoder_blocks=blocks[::-1],
                           num_decoder_blocks=blocks, latent_channels=vae.config.latent_channels,
                           scaling_factor=1.0)


def check_decoder_fits(decoder, vae_scale_factor: int, latent_channels: int, where: str) -> None:
    """One line when a decoder cannot decode this model's latents (other channels or another upsampling)."""
    config = decoder.config
    scale = 2 ** (len(config.block_out_channels) - 1)
    if config.latent_channels != latent_channels or scale != vae_scale_factor:
        raise UserError(f"{where} decodes {config.latent_channels}-channel latents ×{scale}, but this model makes "
                        f"{latent_channels}-channel latents ×{vae_scale_factor}; use a decoder distilled from this "
                        f"model's VAE (python -m pixsig_distill.train distill=tiny_decoder model=...)")


def decoder_folder(folder: str | Path) -> Path:
    """The folder that holds the decoder's config and weights: `folder`, or its `vae/` for a pipeline folder."""
    folder = Path(str(folder)).expanduser()
    return folder / "vae" if (folder / "vae" / "config.json").is_file() else folder


def load_decoder(folder: str | Path, dtype: torch.dtype, device) -> torch.nn.Module:
    """An `AutoencoderTiny` folder (a `distill=tiny_decoder` export, or a TAESD release) loaded by diffusers from
    safetensors only; one line when the folder is not one."""
    from diffusers import AutoencoderTiny

    from .teacher import refuse_pickle_weights

    folder = decoder_folder(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"vae={folder}: no config.json there; give the export/ folder of a distill=tiny_decoder run "
                        f"(or an AutoencoderTiny folder such as a TAESD release)")
    kind = json.loads(config_file.read_text()).get("_class_name")
    if kind != "AutoencoderTiny":
        raise UserError(f"vae={folder} holds a {kind}, not an AutoencoderTiny; give the export/ folder of a "
                        f"distill=tiny_decoder run")
    refuse_pickle_weights(folder)
    try:
        decoder = AutoencoderTiny.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)
    except Exception as err:
        raise UserError(f"could not load the decoder in '{folder}': {str(err).splitlines()[0][:300]}") from None
    return decoder.to(device).eval().requires_grad_(False)


def use_decoder(model, folder: str | Path) -> None:
    """Swap a loaded `Teacher`-shaped model's VAE for the tiny decoder in `folder` (inference `vae=`)."""
    decoder = load_decoder(folder, model.dtype, model.device)
    check_decoder_fits(decoder, model.vae_scale_factor, model.latent_channels, f"vae={folder}")
    model.pipe.vae = decoder


def with_decoder(model, folder: str | Path):
    """A copy of a loaded `Teacher`-shaped model that shares its networks and decodes with the tiny decoder in
    `folder` (the leaderboard's teacher row with a tiny decoder, beside the one with the VAE)."""
    import copy

    decoder = load_decoder(folder, model.dtype, model.device)
    check_decoder_fits(decoder, model.vae_scale_factor, model.latent_channels, f"vae={folder}")
    twin = copy.copy(model)
    twin.pipe = type(model.pipe)(**{**model.pipe.components, "vae": decoder})
    return twin
