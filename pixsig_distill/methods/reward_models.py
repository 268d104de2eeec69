"""Real human-preference reward models as differentiable rewards (`distill/rewards=hpsv2|pickscore|imagereward`),
each loaded from the files its users download and called as `reward(images in [−1, 1] (B, 3, H, W), prompts) -> (B,)`.

* `HPSv2Reward`: HPS v2.1 (Wu et al. 2023), open_clip's ViT-H-14 with the state dict of `HPS_v2.1_compressed.pt`;
  the score is the cosine of the image and prompt embeddings.
* `PickScoreReward`: PickScore (Kirstain et al. 2023), a CLIP-H in transformers format (`CLIPModel.from_pretrained`
  of the PickScore_v1 folder, the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K); the score is
  logit_scale · cosine (≈ 100 · cosine).
* `ImageRewardReward` (methods/imagereward.py): ImageReward-v1.0 (Xu et al. 2023), BLIP with its MLP head.

Each model's own preprocessing (resize, crop or pad, mean/std) runs in torch, so the reward's gradient reaches the
images. Weights load safely: safetensors, or `torch.load(weights_only=True)` of a plain state dict; nothing is ever
unpickled. A memory plan builds each one at its real size on the meta device from its published architecture
(`plan_stand_in`): no file is read. The models stay frozen and in eval mode; the text side runs without gradients.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError, first_line

# OpenAI CLIP's pixel statistics: open_clip's ViT-H-14, laion's CLIP-H processor and BLIP all normalise with them
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- loading ----------------------------------------------------------------------------------------------------

def require(module: str, package: str, reward: str):
    """Import `module`, or one line naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the {reward} reward needs the {package} package: pip install {package}") from None


def existing(path, what: str, fix: str) -> Path:
    """`path` as a Path if it exists, else one line: what is missing and how to get it."""
    if path is None or not Path(str(path)).expanduser().exists():
        raise UserError(f"{what} not found at {path}; {fix}")
    return Path(str(path)).expanduser()


def load_state_dict(path: Path, fix: str) -> dict:
    """A state dict from safetensors, or from a torch pickle that holds only tensors and plain containers
    (`weights_only=True`: no arbitrary object is ever unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for objects beyond plain tensors; anything else: not a checkpoint
        raise UserError(f"{path} could not be read as a plain state dict ({first_line(err)}); this project loads "
                        f"weights only (torch.load(weights_only=True) or safetensors): {fix}") from None


def load_into(model: torch.nn.Module, state: dict, path: Path, ignored: tuple[str, ...] = ()) -> None:
    """Every weight the model has must come from the file, in its shape; keys the reward does not use (`ignored`
    prefixes) may stay behind."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape that differs
        raise UserError(f"{path} does not fit the reward's architecture ({first_line(err, 200)}); is it the right "
                        f"file?") from None
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignored)]
    if result.missing_keys or unexpected:
        wrong = f"missing {result.missing_keys[:3]}" if result.missing_keys else f"unexpected {unexpected[:3]}"
        raise UserError(f"{path} does not fit the reward's architecture ({len(result.missing_keys)} missing, "
                        f"{len(unexpected)} unexpected keys, e.g. {wrong}); is it the right file?")


# ---- preprocessing in torch (differentiable) -----------------------------------------------------------------------

def resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic with antialiasing, as PIL's resize (torchvision's and the processors' path) does; clamped to [0, 1]
    as an 8-bit image would be."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def shortest_side_then_crop(pixels: torch.Tensor, size: int, crop: int) -> torch.Tensor:
    """Resize(size) then CenterCrop(crop): CLIP's and BLIP's evaluation transform."""
    h, w = pixels.shape[-2:]
    short, long = min(h, w), max(h, w)
    scaled = (size, int(size * long / short))
    pixels = resize(pixels, scaled if h <= w else scaled[::-1])
    h, w = pixels.shape[-2:]
    top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
    return pixels[..., top:top + crop, left:left + crop]


def longest_side_then_pad(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's evaluation transform (its open_clip's `ResizeMaxSize`): the longest side to `size`, then black bars
    around the short side to a square."""
    h, w = pixels.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    pixels = resize(pixels, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class PreferenceReward(torch.nn.Module):
    """Frozen, always in eval mode (no dropout), in its own dtype; subclasses set `name` and `forward`."""

    name = "preference"

    def _finish(self, dtype: str, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        from ..teacher import resolve_dtype

        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.to(resolve_dtype(dtype)).eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # a reward model is only ever evaluated

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels → the model's input, in the model's dtype."""
        return ((pixels.float() - self.mean.float()) / self.std.float()).to(self.mean.dtype)

    def _device(self) -> torch.device:
        return self.mean.device

    def objective_models(self) -> dict[str, str]:
        """The model this reward reads, by the name the leaderboard's preference scorers give it and by the identity
        of its weights (a board marks a scorer of the same model "not independent" for the run)."""
        from ..identity import weights_identity

        return {self.model_name: weights_identity(self.weights)}


class ShapeOnlyTokenizer:
    """A plan's stand-in for a tokenizer (none is read): token ids of the model's full context length."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, prompts: list[str]) -> dict:
        return {"input_ids": torch.zeros(len(prompts), self.length, dtype=torch.long),
                "attention_mask": torch.ones(len(prompts), self.length, dtype=torch.long)}


def plain(mapping) -> dict:
    """A config's mapping as plain nested dicts (open_clip reads its config with `.get` and attribute errors)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(mapping, resolve=True) if isinstance(mapping, DictConfig) else dict(mapping or {})


def plan_node(node, target: str, keep: tuple[str, ...]) -> dict:
    """The reward's config node for a plan: `target` (a builder without weights) and the architecture keys; the
    paths, which may be unset (`???`) in a plan, are dropped."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=False)
    return {"_target_": target, **{k: values[k] for k in keep if k in values}}


# ---- HPS v2.1 -------------------------------------------------------------------------------------------------------

HPS_FIX = ("download HPS_v2.1_compressed.pt (huggingface.co/xswu/HPSv2) and set "
           "distill.rewards.hpsv2.reward.checkpoint=/path/to/HPS_v2.1_compressed.pt")


class HPSv2Reward(PreferenceReward):
    """HPS v2.1: open_clip `create_model(architecture)` (ViT-H-14) with the checkpoint's `state_dict` loaded strictly,
    as HPSv2's own scorer does; reward = cos(image embedding, prompt embedding). `architecture_overrides`: open_clip
    config keys replaced (embed_dim, vision_cfg, text_cfg), for tests on a tiny model of the same layout."""

    name = "hpsv2"

    def __init__(self, checkpoint, architecture: str, architecture_overrides: dict | None, dtype: str):
        super().__init__()
        path = existing(checkpoint, "the HPS v2.1 checkpoint", HPS_FIX)
        state = load_state_dict(path, HPS_FIX)
        state = state.get("state_dict", state)  # HPSv2's .pt nests it; a safetensors export holds it bare
        self._build(architecture, plain(architecture_overrides), device="cpu")
        load_into(self.model, state, path)
        self.model_name, self.weights = "HPS v2.1", path
        self._finish(dtype)

    def _build(self, architecture: str, overrides: dict, device) -> None:
        import logging

        open_clip = require("open_clip", "open-clip-torch", self.name)
        quiet = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip warns that it initialised randomly: the weights come next
        try:
            self.model = open_clip.create_model(architecture, pretrained=None, device=device, **overrides)
        finally:
            logging.disable(quiet)
        self.image_size = self.model.visual.image_size[0]  # 224
        self.tokenizer = open_clip.get_tokenizer(architecture)  # its BPE vocabulary ships with open_clip

    @classmethod
    def without_weights(cls, architecture: str, architecture_overrides: dict | None, dtype: str):
        """The same network on the meta device (for a memory plan): shapes only, no file read."""
        reward = cls.__new__(cls)
        PreferenceReward.__init__(reward)
        with torch.device("meta"):
            reward._build(architecture, plain(architecture_overrides), device="meta")
            reward._finish(dtype)
        return reward

    @staticmethod
    def plan_stand_in(node):
        return plan_node(node, "pixsig_distill.methods.reward_models.HPSv2Reward.without_weights",
                         ("architecture", "dtype", "architecture_overrides"))

    @staticmethod
    def plan_note(node) -> str:
        return "the hpsv2 reward is planned at its real size without its weights (open_clip ViT-H-14, fake tensors)"

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(prompts).to(self._device()), normalize=True)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.normalise(longest_side_then_pad((images.float() + 1) / 2, self.image_size))
        image = self.model.encode_image(pixels, normalize=True)
        return (image.float() * self.text_features(prompts).float()).sum(-1)


# ---- PickScore ----------------------------------------------------------------------------------------------------

PICKSCORE_FIX = ("download the folders yuvalkirstain/PickScore_v1 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (its "
                 "processor) and set distill.rewards.pickscore.reward.folder=... and "
                 "distill.rewards.pickscore.reward.processor=...")
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json (PickScore_v1 is its fine-tune): what a plan builds
CLIP_H = {"projection_dim": 1024,
          "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "vocab_size": 49408, "max_position_embeddings": 77},
          "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                            "num_hidden_layers": 32, "patch_size": 14, "image_size": 224}}


class PickScoreReward(PreferenceReward):
    """PickScore: `CLIPModel.from_pretrained(folder)` (transformers reads safetensors, or a .bin with
    weights_only=True) and `CLIPProcessor.from_pretrained(processor)` for its tokenizer and image settings;
    reward = logit_scale.exp() · cos(image embedding, prompt embedding), PickScore's own scale."""

    name = "pickscore"

    def __init__(self, folder, processor, dtype: str):
        super().__init__()
        transformers = require("transformers", "transformers", self.name)
        folder = existing(folder, "the PickScore folder", PICKSCORE_FIX)
        processor = existing(processor, "the CLIP-H processor folder", PICKSCORE_FIX)
        try:
            self.model = transformers.CLIPModel.from_pretrained(folder)
            loaded = transformers.CLIPProcessor.from_pretrained(processor)
        except (OSError, ValueError) as err:
            raise UserError(f"the PickScore files could not be loaded ({first_line(err)}); {PICKSCORE_FIX}") from None
        settings = loaded.image_processor
        self.size = settings.size.get("shortest_edge") or settings.crop_size["height"]
        self.crop = settings.crop_size["height"]
        self.context = min(77, loaded.tokenizer.model_max_length)
        self.tokenizer = lambda prompts: loaded.tokenizer(prompts, padding=True, truncation=True,
                                                          max_length=self.context, return_tensors="pt")
        self.model_name, self.weights = "PickScore", folder
        self._finish(dtype, settings.image_mean, settings.image_std)

    @classmethod
    def without_weights(cls, dtype: str):
        """CLIP-H on the meta device (for a memory plan): shapes only, no file read."""
        from transformers import CLIPConfig, CLIPModel

        reward = cls.__new__(cls)
        PreferenceReward.__init__(reward)
        with torch.device("meta"):
            reward.model = CLIPModel(CLIPConfig(**CLIP_H))
            reward._finish(dtype)
        reward.size = reward.crop = CLIP_H["vision_config"]["image_size"]
        reward.tokenizer = ShapeOnlyTokenizer(CLIP_H["text_config"]["max_position_embeddings"])
        return reward

    @staticmethod
    def plan_stand_in(node):
        return plan_node(node, "pixsig_distill.methods.reward_models.PickScoreReward.without_weights", ("dtype",))

    @staticmethod
    def plan_note(node) -> str:
        return "the pickscore reward is planned at its real size without its weights (CLIP-H, fake tensors)"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.normalise(shortest_side_then_crop((images.float() + 1) / 2, self.size, self.crop))
        image = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        with torch.no_grad():
            tokens = {k: v.to(self._device()) for k, v in self.tokenizer(prompts).items()}
            text = F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)
        return self.model.logit_scale.exp().float() * (image * text).sum(-1)


def _features(output) -> torch.Tensor:
    """transformers ≥ 5 returns the projected embedding as `pooler_output`; earlier versions return it bare."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
