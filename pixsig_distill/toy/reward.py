"""The toy world's differentiable reward: toy-CLIP image–text alignment, the cosine between the image embedding of
a generated image and the text embedding of its prompt (the quantity the leaderboard's CLIP column averages).

Judge it by what it did not train on: the rule-based and the learned attribute readers, and FID and CMMD on the
independent encoder (encoder.py). The toy-CLIP columns of a board (FID and CMMD on toy-CLIP features, CLIP score,
caption accuracy, diversity) read this very model; the card's `objective_models` names it, and the board marks
those figures "not independent" for a reward row."""

from __future__ import annotations

import torch

from ..identity import weights_identity
from .clip import WEIGHTS_DIR, load_toy_clip, prepare_images


class ToyCLIPReward(torch.nn.Module):
    name = "toy_clip"

    def __init__(self, weights_dir: str = str(WEIGHTS_DIR)):
        super().__init__()
        self.clip, _, self.tokenizer = load_toy_clip(weights_dir=weights_dir)
        self.weights_dir = weights_dir
        self.clip.requires_grad_(False)
        self._text: dict[str, torch.Tensor] = {}

    def objective_models(self) -> dict[str, str]:
        return {"toy-CLIP": weights_identity(self.weights_dir)}

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            device = next(self.clip.parameters()).device
            with torch.no_grad():
                features = self.clip.encode_text(self.tokenizer(missing).to(device), normalize=True)
            self._text.update(zip(missing, features))
        return torch.stack([self._text[p] for p in prompts])

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine (B,) of images in [−1, 1] (B, 3, H, W) with their prompts; differentiable in the images."""
        image = self.clip.encode_image(prepare_images(self.clip, (images + 1) / 2), normalize=True)
        return (image.float() * self.text_features(prompts).to(image.device).float()).sum(-1)
