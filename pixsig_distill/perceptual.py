"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") as a loss:
torchmetrics' implementation (VGG or AlexNet features with its learned linear heads), frozen, on images in [-1, 1].

Its backbone weights come from torchvision's download (cached once); offline, building it stops in one line that
names the way out. A memory plan builds it with random weights of the same shapes (`plan_stand_in`): nothing is
downloaded and the activations it holds are counted.
"""

from __future__ import annotations

import torch

from .errors import UserError


class LPIPS(torch.nn.Module):
    def __init__(self, net: str = "vgg", pretrained: bool = True, offline_hint: str = "set its weight to 0"):
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS  # the module behind LearnedPerceptualImagePatchSimilarity

        try:
            self.net = _LPIPS(pretrained=pretrained, net=net, pnet_rand=not pretrained)
        except Exception as err:
            raise UserError(f"LPIPS needs {net.upper()} weights that could not be loaded "
                            f"({str(err).splitlines()[0][:200]}); download them where there is internet or "
                            f"{offline_hint}") from None
        self.net.eval().requires_grad_(False)

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance of two batches of images in [-1, 1]; differentiable in `image`."""
        return self.net(image.float(), target.float()).mean()

    @staticmethod
    def plan_stand_in(node):
        return {**node, "pretrained": False}  # the same network with random weights: no download

    @staticmethod
    def plan_note(node) -> str:
        return "LPIPS is planned with random weights of the same shapes"
