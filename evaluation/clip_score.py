"""CLIP score through open-clip-torch, with its scale always named.

Two scales are in use and they differ by ~100x, so the number never travels without its label:

* `clip` — the mean plain cosine between the image and prompt embeddings (~0.28-0.33 with
  open_clip ViT-g-14 / laion2b_s34b_b88k on real models): the scale of the PixArt-Σ paper's supplement, Table 1.
* `clip_100` (optional) — the mean of 100·max(cos, 0), the scale of torchmetrics' `CLIPScore`
  (which uses OpenAI ViT-L/14; here it is computed with the model configured, and says so).

`model` is an open_clip model name with `pretrained` weights (downloaded by open_clip on first use),
or a `local-dir:FOLDER` / `hf-hub:` reference; eval=toy points it at the toy world's shipped CLIP
(`local-dir:` of `pixsig_distill/toy/weights/clip`). The interval is a percentile bootstrap of the
mean over images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pixsig_distill.errors import UserError

from .scorer import Column, Scorer, ScoringContext

COSINE_SCALE = "plain cosine (the scale of the PixArt-Σ paper's supplement, Table 1)"
SCALE_100 = "100*max(cos, 0) (torchmetrics CLIPScore's scale, same model)"


def load_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) from open_clip; offline without weights → one-line UserError."""
    import open_clip

    if not model.startswith(("hf-hub:", "local-dir:")):  # name mistakes are not download problems: say so
        if model not in open_clip.list_models():
            raise UserError(f"unknown open_clip model '{model}'; use e.g. ViT-g-14 or ViT-L-14 "
                            f"(open_clip.list_models()), or a local-dir:FOLDER")
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags and not (pretrained and Path(pretrained).is_file()):
            raise UserError(f"clip.pretrained={pretrained!r} is not a weight tag of {model}; use one of {tags} "
                            f"or a checkpoint file")
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip's INFO chatter, and its failure line: the UserError is the one line
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device,
                                                                    require_pretrained=True)
        return clip.eval(), preprocess, open_clip.get_tokenizer(model)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"open_clip model '{model}' with pretrained='{pretrained}' could not be loaded (weights "
                        f"download from the hub on first use; offline here?): {first}; run once with internet, "
                        f"or use eval=toy") from None
    finally:
        logging.disable(previous)


class CLIPScorer(Scorer):
    """Mean cosine between each image and its own prompt, with open_clip's own preprocessing."""

    name = "clip"
    columns = (Column("clip", "CLIP", digits=4, better="higher"),)

    def __init__(self, context: ScoringContext, model: str, pretrained: str | None = None, batch_size: int = 64,
                 also_100: bool = True, description: str | None = None):
        super().__init__(context)
        self.model_name, self.pretrained, self.description = model, pretrained, description
        self.device = torch.device(context.device)
        self.batch_size, self.also_100, self.progress = batch_size, also_100, context.progress
        self.model, self.preprocess, self.tokenizer = load_clip(model, pretrained, self.device)

    def settings(self) -> dict:
        name = self.description or f"open_clip {self.model_name} / {self.pretrained}"
        out = {"model": self.model_name, "pretrained": self.pretrained, "description": name, "scale": COSINE_SCALE,
               "resamples": self.context.resamples}
        if self.also_100:
            out["scale_100"] = SCALE_100
        return out

    def models(self) -> dict[str, str]:
        if self.model_name.startswith("local-dir:"):
            from pixsig_distill.identity import weights_identity

            return {self.description or self.model_name: weights_identity(self.model_name.split(":", 1)[1])}
        return {f"open_clip {self.model_name} / {self.pretrained}": f"open_clip:{self.model_name}:{self.pretrained}"}

    @torch.no_grad()
    def cosines(self, images, prompts: list[str], desc: str = "CLIP score") -> np.ndarray:
        """Per-pair cosine (N,) for uint8 images (N, H, W, 3) (array or lazy sequence) and prompts."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for start in tqdm(range(0, len(images), self.batch_size), desc=desc, disable=not self.progress):
            stop = min(start + self.batch_size, len(images))
            pixels = torch.stack([self.preprocess(Image.fromarray(np.asarray(images[i]))) for i in range(start, stop)])
            image = self.model.encode_image(pixels.to(self.device), normalize=True)
            text = self.model.encode_text(self.tokenizer(list(prompts[start:stop])).to(self.device), normalize=True)
            out.append((image.float() * text.float()).sum(-1).cpu())
        return torch.cat(out).numpy().astype(np.float64)

    def score(self, images, prompts: list[str]) -> dict:
        cos = self.cosines(images, prompts)
        result = {**self.mean_with_interval("clip", cos), "paired": {"clip": cos}}
        if self.also_100:
            result["clip_100"] = float((100 * np.maximum(cos, 0)).mean())
        return result
