"""Training of the toy teacher's parts: the VAE, then the PixArt transformer on VAE latents.

Both are plain loops (no accelerate): they run once, on a CPU, to produce the shipped weights, and
`scripts/build_toy_world.py` reproduces those weights from a seed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, PixArtSigmaPipeline
from tqdm.auto import tqdm

from ..schedule import add_noise, snr
from . import components
from .world import ToyWorldDataset, all_scenes

log = logging.getLogger(__name__)


def _batches(split: str, batch_size: int, steps: int, seed: int):
    """Deterministic stream of (images in [-1,1], captions) rendered on the fly: no epoch, no overfitting."""
    data = ToyWorldDataset(split, size=batch_size * steps, seed=seed)
    for step in range(steps):
        items = [data[step * batch_size + i] for i in range(batch_size)]
        yield torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def _cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- VAE ---------------------------------------------------------------------------------------

def train_vae(out_dir: str | Path, steps: int = 2500, batch_size: int = 64, lr: float = 1e-3, kl_weight: float = 1e-4,
              seed: int = 0, log_every: int = 250) -> AutoencoderKL:
    """Reconstruction (MSE) + β·KL, then set `scaling_factor` = 1/std of the latents (as SD/SDXL do)."""
    torch.manual_seed(seed)
    vae = components.toy_vae(seed).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, warmup=100))
    bar = tqdm(_batches("train", batch_size, steps, seed), total=steps, desc="toy VAE")
    for step, (images, _) in enumerate(bar):
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, images)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
            log.info("vae step %d  mse %.5f  kl %.3f", step, mse.item(), kl.item())
    vae.eval()
    with torch.no_grad():
        images, _ = next(_batches("train", 1024, 1, seed + 1))
        latents = vae.encode(images).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(Path(out_dir), safe_serialization=True)
    return vae


# ---- transformer --------------------------------------------------------------------------------

@torch.no_grad()
def _caption_bank(tokenizer, text_encoder, captions: list[str]):
    """T5 embeddings of every caption of the world (2,268 of them) plus "", computed once."""
    inputs = tokenizer(captions, padding="max_length", max_length=components.MAX_TOKENS, truncation=True,
                       return_tensors="pt")
    embeds = text_encoder(inputs.input_ids, attention_mask=inputs.attention_mask)[0]
    return {c: (embeds[i], inputs.attention_mask[i]) for i, c in enumerate(captions)}


def train_teacher(out_dir: str | Path, vae: AutoencoderKL, steps: int = 4000, batch_size: int = 128, lr: float = 5e-4,
                  warmup: int = 300, ema_decay: float = 0.999, p_uncond: float = 0.1, min_snr_gamma: float = 5.0,
                  seed: int = 0, log_every: int = 100, num_layers: int = 8) -> PixArtSigmaPipeline:
    """ε-prediction training as PixArt (DDPM linear schedule), with Min-SNR-γ loss weights (Hang et al.
    2023) so the high-noise steps that decide layout and colour are not drowned by the easy low-noise ones,
    caption dropout for classifier-free guidance, and an EMA of the weights as the shipped model."""
    torch.manual_seed(seed)
    tokenizer = components.toy_tokenizer()
    text_encoder = components.toy_text_encoder(len(tokenizer), seed)
    scheduler = components.toy_scheduler()
    transformer = components.toy_transformer(seed, num_layers=num_layers).train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    vae = vae.eval().requires_grad_(False)
    bank = _caption_bank(tokenizer, text_encoder, [s.caption for s in all_scenes()] + [""])
    alphas_cumprod = scheduler.alphas_cumprod.float()

    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    history, start = [], time.time()
    bar = tqdm(_batches("train", batch_size, steps, seed + 100), total=steps, desc="toy teacher")
    for step, (images, captions) in enumerate(bar):
        with torch.no_grad():
            x0 = vae.encode(images).latent_dist.sample(gen) * vae.config.scaling_factor
        drop = torch.rand(len(captions), generator=gen) < p_uncond  # caption dropout → learns ε(x, "") for CFG
        embeds = torch.stack([bank["" if d else c][0] for c, d in zip(captions, drop)])
        mask = torch.stack([bank["" if d else c][1] for c, d in zip(captions, drop)])
        t = torch.randint(0, 1000, (len(captions),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = add_noise(x0, noise, t, alphas_cumprod)
        out = transformer(x_t, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        eps = out[:, :4]  # the learned-σ channels are not trained (every diffusers sampler drops them)
        s = snr(t, alphas_cumprod)
        weight = torch.clamp(s, max=min_snr_gamma) / s  # Min-SNR-γ for ε-prediction (Hang et al., eq. 9)
        loss = (weight * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights are forgotten fast
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), transformer.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % log_every == 0 or step == steps - 1:
            rate = (step + 1) * batch_size / (time.time() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
            log.info("teacher step %d  loss %.5f  grad %.3f  lr %.2e  %.0f img/s", step, loss.item(),
                     grad_norm.item(), sched.get_last_lr()[0], rate)
            history.append({"step": step, "loss": loss.item(), "grad_norm": grad_norm.item()})
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=ema,
                               scheduler=scheduler)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "training_log.json").write_text(json.dumps(
        {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "minutes": (time.time() - start) / 60,
         "history": history}, indent=1))
    return pipe
