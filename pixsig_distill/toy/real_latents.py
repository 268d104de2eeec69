"""The toy world's real images for DMD2's GAN: training-split renders, encoded by the toy VAE and T5 in memory."""

from __future__ import annotations

import numpy as np
from torch.utils.data import StackDataset

from ..errors import UserError
from ..real_images import LatentBank, blank_real_images, encode_captions, encode_images
from .world import ToyWorldDataset


def toy_real_latents(teacher, n: int = 2000, seed: int = 7) -> LatentBank:
    """`n` captioned images of the training split (never the held-out captions the evaluation uses)."""
    if teacher.resolution > 64:  # the toy world is flat shapes at 32 px: no real data for a real model's GAN
        raise UserError(f"the GAN's real images are the toy world's shapes (distill/gan/real_images=toy, the default), "
                        f"made for model=toy, not a {teacher.resolution}-px model; give yours: "
                        f"distill/gan/real_images=folder distill.gan.real_images.folder=DIR (docs/dmd2.md)")
    dataset = ToyWorldDataset("train", size=n, seed=seed, resolution=teacher.resolution)
    items = [dataset[i] for i in range(n)]
    images = np.stack([((it["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
                       for it in items])
    embeds, mask = encode_captions(teacher, [it["caption"] for it in items])
    return LatentBank(StackDataset(latents=encode_images(teacher, images), embeds=embeds, mask=mask))


toy_real_latents.plan_stand_in = blank_real_images  # a plan builds zero rows of the right shapes
