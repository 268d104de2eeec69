"""Distil the teacher's VAE decoder into a tiny one: diffusers' `AutoencoderTiny` (the TAESD architecture).

After a one-step student the transformer runs once and the VAE decode is the bill (decoders.py). This method
trains `AutoencoderTiny`'s decoder to reproduce the teacher VAE's images from the same latents:

    L = w_pix·‖D(z) − VAE(z)‖₁ + w_lpips·LPIPS(D(z), VAE(z)) + w_adv·(−E[h(D(z))])

with z the latents a generation feeds the decoder: real images encoded by the teacher's VAE (`distill.latents`:
the toy world's renders, or a captioned image folder) mixed with a student's own one-step samples
(`distill.student`, `distill.student_share`), so the decoder learns what students actually make. The optional
adversarial term is the hinge GAN of a small patch discriminator h on images (Lim & Ye 2017), trained against the
teacher VAE's images. The export is an `AutoencoderTiny` folder that `AutoencoderTiny.from_pretrained` loads and
that a stock `PixArtSigmaPipeline` takes as `vae=` (decoders.py: latent scaling).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from ..decoders import tiny_decoder_like
from ..distributed import full_parameters
from ..draws import StepDraws, step_draws
from ..errors import UserError
from ..model_card import DECODER_CARD, write_model_card
from .base import Method
from .common import EMA, accumulated_step, trained_parameters

log = logging.getLogger(__name__)


class PatchDiscriminator(torch.nn.Module):
    """A few strided convolutions → one logit per image patch (pix2pix's PatchGAN, small)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        act = torch.nn.LeakyReLU(0.2)
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, channels, 4, 2, 1), act,
            torch.nn.Conv2d(channels, 2 * channels, 4, 2, 1), torch.nn.GroupNorm(8, 2 * channels), act,
            torch.nn.Conv2d(2 * channels, 1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class TinyDecoder(Method):
    method_name = "tiny_decoder"

    def __init__(self, teacher, *, decoder: dict, latents, student: str | None, student_share: float,
                 pixel_weight: float, lpips_weight: float, lpips, adversarial_weight: float,
                 discriminator_channels: int, ema_decay: float | None, optimizer, grad_clip: float | None):
        """Every setting is required: conf/distill/tiny_decoder.yaml is the one home of the defaults."""
        if not 0 <= student_share <= 1:
            raise UserError(f"distill.student_share={student_share}; use a fraction in [0, 1]")
        if student_share > 0 and not student:
            log.warning("distill.student_share=%s without distill.student: training on real latents only (give a "
                        "student export to decode its samples too)", student_share)
        for name, weight in (("pixel_weight", pixel_weight), ("lpips_weight", lpips_weight),
                             ("adversarial_weight", adversarial_weight)):
            if weight < 0:
                raise UserError(f"distill.{name}={weight}; use a weight >= 0")
        if not pixel_weight and not lpips_weight and not adversarial_weight:
            raise UserError("distill.pixel_weight, lpips_weight and adversarial_weight are all 0: the decoder has no "
                            "loss to learn from; give distill.pixel_weight=1 (the default)")
        self.teacher = teacher
        self.weights = {"pixel": float(pixel_weight), "lpips": float(lpips_weight), "adv": float(adversarial_weight)}
        self.grad_clip = grad_clip
        self.student_share = float(student_share) if student else 0.0
        self.student_folder = str(student) if student else None
        if student:
            from ..students import read_card

            read_card(student)  # a folder that is not a student export: one line now, not at the first step
        self.student = None  # loaded on first use: a plan or a resume check need not read its weights
        # Real latents: the batch's own when the data has them (data=images: an encoded, cached image folder), else
        # random rows of this bank (the toy world's renders, or a folder encoded for the decoder alone).
        self.bank = latents(teacher=teacher) if callable(latents) else latents
        # The trained network is the AutoencoderTiny's decoder alone (its forward is the decode: what DDP, FSDP2 and
        # DeepSpeed wrap); the export is the whole AutoencoderTiny, its encoder untrained (encode with the VAE).
        self.autoencoder = tiny_decoder_like(teacher.vae, **decoder)
        self.decoder = self.autoencoder.decoder.train()
        self.ema = None if ema_decay is None else EMA(self.decoder, ema_decay)
        self.models = {"decoder": self.decoder}
        self.discriminator = None
        self.optimizers = {"decoder": optimizer([p for _, p in trained_parameters(self.decoder)])}
        if self.weights["adv"] > 0:
            self.discriminator = PatchDiscriminator(discriminator_channels)
            self.models["discriminator"] = self.discriminator
            self.optimizers["discriminator"] = optimizer(self.discriminator.parameters())
        # a partial of perceptual.LPIPS, built (weights downloaded, or one line offline) only when it is used
        self.lpips = lpips(offline_hint="set distill.lpips_weight=0") if self.weights["lpips"] > 0 else None
        self.accelerator = None

    # ---- loop interface ---------------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        modules = {name: self.unwrap(model) for name, model in self.models.items()}
        if self.ema is not None:
            modules["decoder_ema"] = self.ema
        return modules

    def check_engine(self, engine: str) -> None:
        """What it cannot run under `engine` (distributed.engine_name): refused by training and by a plan alike."""
        if engine in ("fsdp2", "zero3"):  # FSDP2 wraps transformer blocks; a decoder of ~1M weights needs no shards
            raise UserError("distill=tiny_decoder trains a decoder of about a million weights: it needs no sharding; "
                            "launch it with DDP (conf/accelerate/ddp.yaml) or DeepSpeed ZeRO-2, not FSDP2 or ZeRO-3")
        if engine == "zero2" and self.discriminator is not None:
            raise UserError("distill.adversarial_weight > 0 under DeepSpeed: the decoder's GAN loss back-propagates "
                            "through the discriminator, a second engine, which DeepSpeed 0.19 does not take; launch "
                            "it with DDP (conf/accelerate/ddp.yaml), or set distill.adversarial_weight=0")

    def prepare(self, accelerator) -> None:
        self.prepare_networks(accelerator, self.grad_clip)

    def latents(self, batch: dict, gen: StepDraws) -> torch.Tensor:
        """This step's latents: the student's samples for the batch's first `student_share` rows, encoded real
        images for the rest (the numbers come from the step's draws, so a resume replays them)."""
        b, device = len(batch["prompt"]), self.teacher.device
        n_student = round(b * self.student_share)
        parts = []
        if n_student:
            noise = gen.randn(self.teacher.latent_shape(n_student)).to(device, self.teacher.dtype)
            parts.append(self._student_samples(batch["embeds"][:n_student], batch["mask"][:n_student], noise))
        if b - n_student:
            if "latents" in batch:
                parts.append(batch["latents"][n_student:])
            elif self.bank is not None:
                parts.append(self.bank.sample(b - n_student, gen, device, self.teacher.dtype)[0])
            else:
                raise UserError("distill=tiny_decoder needs real latents: data=images data.folder=DIR, or "
                                "distill/latents=folder distill.latents.folder=DIR (distill/latents=toy on model=toy)")
        return torch.cat([p.to(device, torch.float32) for p in parts])

    @torch.no_grad()
    def _student_samples(self, embeds, mask, noise) -> torch.Tensor:
        from ..students import student_on_teacher

        if self.student is None:
            self.student = student_on_teacher(self.student_folder, self.teacher)
        model, spec = self.student
        return model.sample(embeds=embeds, mask=mask, noise=noise, num_inference_steps=spec.num_inference_steps,
                            guidance_scale=spec.guidance_scale, timesteps=spec.timesteps)

    def train_step(self, batch: dict, gen: torch.Generator | StepDraws, micro_batches: int = 1) -> dict:
        gen = step_draws(gen)
        z = self.latents(batch, gen)
        with torch.no_grad():  # the target: the teacher VAE's image, clamped as every pipeline clamps it
            target = self.teacher.decode(z).float().clamp(-1, 1)
        parts = [slice(i * len(z) // micro_batches, (i + 1) * len(z) // micro_batches) for i in range(micro_batches)]
        logs = {}

        def decoder_loss(rows: slice):
            image = self.decoder(z[rows]).float()  # DecoderTiny: latents → images in [-1, 1]
            terms = {"pixel": F.l1_loss(image, target[rows])}
            if self.weights["lpips"] > 0:
                terms["lpips"] = self.lpips.to(image.device)(image.clamp(-1, 1), target[rows])
            if self.weights["adv"] > 0:
                terms["adv"] = -self.discriminator(image).mean()  # hinge GAN, generator side
            for name, value in terms.items():
                logs[f"loss_{name}"] = logs.get(f"loss_{name}", 0.0) + value.detach().float() / len(parts)
            return sum(self.weights[name] * value for name, value in terms.items()) / len(parts)

        if self.discriminator is not None:
            self.discriminator.requires_grad_(False)
        logs["loss"], logs["grad_norm_decoder"] = accumulated_step(
            self.accelerator, self.decoder, self.optimizers["decoder"],
            [lambda rows=rows: decoder_loss(rows) for rows in parts], self.grad_clip)
        if self.discriminator is not None:
            self.discriminator.requires_grad_(True)
            logs.update(self._discriminator_step(z, target, parts))
        if self.ema is not None:
            with full_parameters(self.accelerator, self.decoder) as network:  # FSDP2: gathered for the average
                self.ema.update(network)
        return logs

    def _discriminator_step(self, z, target, parts) -> dict:
        """Hinge loss: E[relu(1 − h(VAE(z)))] + E[relu(1 + h(D(z)))] (Lim & Ye 2017)."""
        with torch.no_grad():
            fake = self.unwrap(self.decoder)(z).float()

        def loss(rows: slice):
            return (F.relu(1 - self.discriminator(target[rows])).mean()
                    + F.relu(1 + self.discriminator(fake[rows])).mean()) / len(parts)

        value, norm = accumulated_step(self.accelerator, self.discriminator, self.optimizers["discriminator"],
                                       [lambda rows=rows: loss(rows) for rows in parts], self.grad_clip)
        return {"loss_discriminator": value, "grad_norm_discriminator": norm}

    # ---- inference and export -----------------------------------------------------------------
    def sampling_decoder(self):
        """The decoder the export holds: its EMA weights when it has an EMA (a context manager)."""
        return self.ema_or_self(self.unwrap(self.decoder), self.ema)

    @torch.no_grad()
    def sample(self, embeds, mask, noise) -> torch.Tensor:
        """Preview latents: the student's samples when there is one, else the teacher's own sampler."""
        if self.student_folder:
            return self._student_samples(embeds, mask, noise)
        return self.teacher.sample(embeds=embeds, mask=mask, noise=noise)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Previews show what the tiny decoder makes of the latents (the loop decodes with this when it exists)."""
        with self.sampling_decoder() as decoder:
            return decoder(latents.float()).clamp(-1, 1)

    def card(self) -> dict:
        vae = self.teacher.vae
        return {"method": self.method_name, "teacher": str(getattr(self.teacher.pipe, "name_or_path", "") or "") or None,
                "student": self.student_folder, "resolution": self.teacher.resolution,
                "latent_channels": vae.config.latent_channels, "vae_scale_factor": self.teacher.vae_scale_factor}

    def export(self, out_dir: Path) -> Path:
        """An `AutoencoderTiny` folder (config.json + safetensors) with its card, written as `<out_dir>.tmp` and
        renamed, so an export that exists is complete."""
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.no_grad(), self.sampling_decoder():  # the EMA weights, in place in the autoencoder's decoder
            self.autoencoder.save_pretrained(tmp, safe_serialization=True)
        (tmp / DECODER_CARD).write_text(json.dumps(self.card(), indent=1))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
        write_model_card(out_dir)  # README.md; the training run adds its facts and figures later
        return out_dir
