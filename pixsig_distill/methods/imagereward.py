"""ImageReward-v1.0 (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation") as a differentiable reward (`distill/rewards=imagereward`).

ImageReward is BLIP: a ViT-L/16 image encoder at 224 px, a BERT-base text encoder with a cross-attention to the image
in every layer (configured by its `med_config.json`), and an MLP head on the text encoder's first token. Its users
load `ImageReward.pt` (a plain state dict: `blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`, and two
projections it does not score with) into that network. Here the same network is built from installed classes
whose parameter names are the checkpoint's, so it loads with no renaming:

* the image encoder is timm's `VisionTransformer`: BLIP's ViT is a copy of it (same names, LayerNorm eps 1e-6,
  exact GELU, a bias on the fused qkv), and timm is already installed with open_clip;
* the text encoder is transformers' `BlipTextModel`, the port of BLIP's `med.py` BertModel (same names; every layer
  has its cross-attention when `is_decoder=True`, and the forward is bidirectional with `is_decoder=False`).

Reward = (mlp(text_encoder(prompt | image)[CLS]) − mean) / std with ImageReward's own mean and std, on images
resized and cropped to 224 px in torch. The prompt is tokenised by bert-base-uncased's tokenizer with BLIP's two
added tokens, padded and cut to 35 tokens, as ImageReward does.
"""

from __future__ import annotations

import json

import torch

from ..errors import UserError, first_line
from .reward_models import (PreferenceReward, ShapeOnlyTokenizer, existing, load_into, load_state_dict, plan_node,
                            require, shortest_side_then_crop)

IMAGEREWARD_FIX = ("download ImageReward.pt and med_config.json (huggingface.co/THUDM/ImageReward) and the "
                   "bert-base-uncased tokenizer folder (huggingface.co/google-bert/bert-base-uncased), and set "
                   "distill.rewards.imagereward.reward.checkpoint=..., .med_config=... and .tokenizer=...")
# The head's raw output standardised by these (ImageReward's published constants)
RAW_MEAN, RAW_STD = 0.16717362830052426, 1.0333394966054072
PROMPT_TOKENS = 35
# THUDM/ImageReward's med_config.json (BERT-base, cross-attention in every layer): what a plan builds
MED_CONFIG = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "max_position_embeddings": 512, "hidden_act": "gelu",
              "layer_norm_eps": 1e-12, "pad_token_id": 0, "add_cross_attention": True}
# In ImageReward.pt, not used to score: BLIP's contrastive projections and the text encoder's position-id buffer
UNUSED_KEYS = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


class ImageRewardReward(PreferenceReward):
    """`vision`: the ViT's width, layers, heads, patch_size and image_size (ViT-L/16 at 224 px in the YAML)."""

    name = "imagereward"

    def __init__(self, checkpoint, med_config, tokenizer, vision: dict, dtype: str):
        super().__init__()
        path = existing(checkpoint, "ImageReward.pt", IMAGEREWARD_FIX)
        med = json.loads(existing(med_config, "ImageReward's med_config.json", IMAGEREWARD_FIX).read_text())
        self._build(med, dict(vision))
        self.tokenizer = _blip_tokenizer(existing(tokenizer, "the bert-base-uncased tokenizer folder",
                                                  IMAGEREWARD_FIX))
        load_into(self, load_state_dict(path, IMAGEREWARD_FIX), path, UNUSED_KEYS)
        self.model_name, self.weights = "ImageReward-v1.0", path
        self._finish(dtype)

    def _build(self, med: dict, vision: dict) -> None:
        require("timm", "timm", self.name)
        from timm.models.vision_transformer import VisionTransformer
        from transformers import BlipTextConfig, BlipTextModel

        if not med.get("add_cross_attention"):
            raise UserError("the med_config.json given to the imagereward reward has no cross-attention "
                            "(add_cross_attention); use ImageReward's own med_config.json")
        self.image_size = vision["image_size"]
        self.blip = torch.nn.Module()
        self.blip.visual_encoder = VisionTransformer(
            img_size=vision["image_size"], patch_size=vision["patch_size"], embed_dim=vision["width"],
            depth=vision["layers"], num_heads=vision["heads"], num_classes=0, global_pool="")
        text = BlipTextConfig(**{k: med[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                     "num_hidden_layers", "num_attention_heads", "hidden_act",
                                                     "max_position_embeddings", "layer_norm_eps", "pad_token_id")},
                              encoder_hidden_size=vision["width"],  # BLIP sets the cross-attention's input width
                              is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              bos_token_id=None, eos_token_id=None, sep_token_id=None)  # it generates nothing
        self.blip.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = torch.nn.Module()
        hidden = med["hidden_size"]
        # The head has no nonlinearity; the Identity slots stand where dropout sits in training and keep the
        # checkpoint's layer numbers (mlp.layers.0, 2, 4, 6, 7).
        self.mlp.layers = torch.nn.Sequential(
            torch.nn.Linear(hidden, 1024), torch.nn.Identity(), torch.nn.Linear(1024, 128), torch.nn.Identity(),
            torch.nn.Linear(128, 64), torch.nn.Identity(), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    @classmethod
    def without_weights(cls, vision: dict, dtype: str):
        """The same network on the meta device (for a memory plan), with the published med_config: no file read."""
        reward = cls.__new__(cls)
        PreferenceReward.__init__(reward)
        with torch.device("meta"):
            reward._build(MED_CONFIG, dict(vision))
            reward._finish(dtype)
        reward.tokenizer = ShapeOnlyTokenizer(PROMPT_TOKENS)
        return reward

    @staticmethod
    def plan_stand_in(node):
        return plan_node(node, "pixsig_distill.methods.imagereward.ImageRewardReward.without_weights",
                         ("vision", "dtype"))

    @staticmethod
    def plan_note(node) -> str:
        return ("the imagereward reward is planned at its real size without its weights (BLIP ViT-L + BERT-base, "
                "fake tensors)")

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.normalise(shortest_side_then_crop((images.float() + 1) / 2, self.image_size, self.image_size))
        image = self.blip.visual_encoder.forward_features(pixels)  # (B, 1 + patches, width), after the final norm
        tokens = {k: v.to(self._device()) for k, v in self.tokenizer(prompts).items()}
        text = self.blip.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                      encoder_hidden_states=image,
                                      encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long,
                                                                        device=image.device))
        raw = self.mlp.layers(text.last_hidden_state[:, 0]).float().squeeze(-1)
        return (raw - RAW_MEAN) / RAW_STD


def _blip_tokenizer(folder):
    """bert-base-uncased's tokenizer with BLIP's added [DEC] and [ENC] tokens (ids 30522, 30523), as ImageReward
    builds it; every prompt padded and cut to 35 tokens."""
    from transformers import BertTokenizer

    try:
        tokenizer = BertTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise UserError(f"no BERT tokenizer in {folder} ({first_line(err)}); {IMAGEREWARD_FIX}") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return lambda prompts: tokenizer(prompts, padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                     return_tensors="pt")
