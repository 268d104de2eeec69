"""The real reward models (methods/reward_models.py, methods/imagereward.py): random weights of a tiny configuration,
saved in each model's published file layout (the same file names, key names and formats), loaded back through the
reward's own loader; the reward is differentiable in the images, its gradient reaches DMD's generator, a missing
or unsafe file is refused in one line, and the planner builds each one at its real size without reading a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import pixsig_distill
from pixsig_distill.config import build
from pixsig_distill.errors import UserError

# open_clip config keys replaced for a tiny model of ViT-H-14's layout (its tokenizer's vocabulary is kept)
TINY_HPS = {"embed_dim": 16, "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16,
                                            "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
TINY_VIT = {"width": 32, "layers": 1, "heads": 2, "patch_size": 16, "image_size": 32}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cube", "sphere", "two", "left"]
PROMPTS = ["a red cube", "two blue sphere left"]
REWARD_CONFIGS = Path(pixsig_distill.__file__).parent / "conf" / "distill" / "rewards"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Each reward's files as their users download them, with random weights of a tiny configuration."""
    import open_clip
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BlipTextConfig, BlipTextModel, CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("rewards")
    torch.manual_seed(0)
    # HPSv2: a torch pickle {"state_dict": open_clip CLIP's state dict}, named as HPSv2 publishes it
    clip = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_HPS)
    torch.save({"state_dict": clip.state_dict()}, root / "HPS_v2.1_compressed.pt")
    # PickScore: a transformers CLIPModel folder (config.json + model.safetensors); the processor's folder as laion's
    # CLIP-H has it (a BPE vocabulary, merges, and the older configs with integer sizes)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    processor = root / "clip_h_processor"
    processor.mkdir()
    (processor / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (processor / "merges.txt").write_text("#version: 0.2\n")
    (processor / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 77}))
    (processor / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "CLIPFeatureExtractor", "size": 28, "crop_size": 28, "do_resize": True,
         "do_center_crop": True, "do_normalize": True, "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    towers = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
    CLIPModel(CLIPConfig(projection_dim=8, text_config={**towers, "vocab_size": len(vocab), "eos_token_id": 1,
                                                         "bos_token_id": 0, "pad_token_id": 1},
                         vision_config={**towers, "patch_size": 14, "image_size": 28})).save_pretrained(
        root / "PickScore_v1")
    # ImageReward: a plain state dict ImageReward.pt (BLIP's ViT, its BERT with cross-attention, the MLP head, and the
    # projections and position ids it does not score with), its med_config.json and a BERT tokenizer folder
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 16, "intermediate_size": 32,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 1, "pad_token_id": 0, "vocab_size": len(WORDS) + 2, "encoder_width": 16,
           "add_cross_attention": True}
    (root / "med_config.json").write_text(json.dumps(med))
    (root / "bert-base-uncased").mkdir()  # as the hub has it (less its tokenizer.json, which transformers rebuilds)
    (root / "bert-base-uncased" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (root / "bert-base-uncased" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                            global_pool="")
    bert = BlipTextModel(BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=40,
                                        encoder_hidden_size=32, bos_token_id=None, sep_token_id=None),
                         add_pooling_layer=False)
    head = [torch.nn.Linear(*shape) for shape in ((16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))]
    state = {**{f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()},
             **{f"blip.text_encoder.{k}": v for k, v in bert.state_dict().items()},
             **{f"mlp.layers.{i}.{k}": v for i, layer in zip((0, 2, 4, 6, 7), head)
                for k, v in layer.state_dict().items()},
             "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
             "blip.vision_proj.weight": torch.randn(8, 32), "blip.text_proj.weight": torch.randn(8, 16)}
    for name in ("blip.visual_encoder.blocks.0.attn.qkv.weight", "blip.visual_encoder.pos_embed",
                 "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight",
                 "blip.text_encoder.embeddings.word_embeddings.weight", "mlp.layers.7.weight"):
        assert name in state  # ImageReward.pt's own names
    torch.save(state, root / "ImageReward.pt")
    return root


def _nodes(root) -> dict:
    """The reward nodes of conf/distill/rewards/<name>.yaml, pointed at the tiny files."""
    return {"hpsv2": {"checkpoint": str(root / "HPS_v2.1_compressed.pt"), "architecture_overrides": TINY_HPS},
            "pickscore": {"folder": str(root / "PickScore_v1"), "processor": str(root / "clip_h_processor")},
            "imagereward": {"checkpoint": str(root / "ImageReward.pt"), "med_config": str(root / "med_config.json"),
                            "tokenizer": str(root / "bert-base-uncased"), "vision": TINY_VIT}}


def _reward(name: str, root, **changes):
    """The reward as its YAML builds it, pointed at the tiny files."""
    node = OmegaConf.load(REWARD_CONFIGS / f"{name}.yaml")[name].reward
    node.merge_with({**_nodes(root)[name], **changes})
    return build(node)


@pytest.mark.parametrize("name", ["hpsv2", "pickscore", "imagereward"])
def test_each_reward_loads_its_published_files_and_is_differentiable(published, name):
    reward = _reward(name, published)
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.training
    images = (torch.rand(2, 3, 20, 20) * 2 - 1).requires_grad_(True)  # resized by the model's own preprocessing
    values = reward(images, PROMPTS)
    assert values.shape == (2,) and torch.isfinite(values).all()
    values.sum().backward()
    assert images.grad.abs().sum() > 0  # the gradient reaches the images through the resize and normalisation
    # the prompts are read: the same images with the prompts swapped score differently
    assert not torch.allclose(reward(images.detach(), PROMPTS[::-1]), values.detach())
    # the card names the model by its weights: a board marks a scorer of the same weights "not independent"
    from pixsig_distill.identity import weights_identity

    assert list(reward.objective_models().values()) == [weights_identity(reward.weights)]


def test_the_rewards_hold_the_files_weights(published):
    """What was saved is what scores: a tensor of each file, read back from the loaded model."""
    saved = torch.load(published / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    assert torch.equal(_reward("hpsv2", published).model.visual.proj, saved["visual.proj"])
    from safetensors.torch import load_file

    saved = load_file(published / "PickScore_v1" / "model.safetensors")
    assert torch.equal(_reward("pickscore", published).model.text_projection.weight, saved["text_projection.weight"])
    saved = torch.load(published / "ImageReward.pt", weights_only=True)
    reward = _reward("imagereward", published)
    assert torch.equal(reward.mlp.layers[7].weight, saved["mlp.layers.7.weight"])
    assert torch.equal(reward.blip.text_encoder.encoder.layer[0].crossattention.self.key.weight,
                       saved["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"])


def test_missing_or_unsafe_files_are_refused_in_one_line(published, tmp_path):
    with pytest.raises(UserError, match=r"HPS_v2.1_compressed.pt .*distill.rewards.hpsv2.reward.checkpoint="):
        _reward("hpsv2", published, checkpoint=str(tmp_path / "nothing.pt"))
    with pytest.raises(UserError, match="pip install open-clip-torch"):
        import pixsig_distill.methods.reward_models as module

        module.require("no_such_module_here", "open-clip-torch", "hpsv2")
    with pytest.raises(UserError, match=r"tokenizer folder not found .*\.tokenizer="):
        _reward("imagereward", published, tokenizer=str(tmp_path / "none"))
    # a pickle that needs an arbitrary object to load is never unpickled
    torch.save({"mlp": torch.nn.Linear(2, 2)}, tmp_path / "ImageReward.pt")
    with pytest.raises(UserError, match="weights_only"):
        _reward("imagereward", published, checkpoint=str(tmp_path / "ImageReward.pt"))
    # the wrong model's weights: named missing keys, not a traceback
    with pytest.raises(UserError, match="does not fit"):
        _reward("hpsv2", published, architecture_overrides={**TINY_HPS, "embed_dim": 8})


def test_a_reward_models_gradient_reaches_the_generator(published):
    """One DMD step on the known-answer teacher with each reward at λ = 1 and at λ = 0 (logged, not trained on):
    the generators differ only if the reward's gradient reached the generator through the decoder."""
    import known_answer as ka

    teacher = ka.known_teacher()

    def generator_after_one_step(name: str, weight: float) -> torch.Tensor:
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            cfg = compose("train", overrides=["distill=dmd", "model=pixart_sigma_512", f"+distill/rewards={name}",
                                              "distill.fake_updates_per_step=1", "distill.ema_decay=null",
                                              f"distill.rewards.{name}.weight={weight}"])
        cfg.distill.rewards[name].reward.merge_with(_nodes(published)[name])
        torch.manual_seed(0)
        method = build(cfg.distill, teacher=teacher)
        method.prepare(Accelerator(cpu=True))
        gen = torch.Generator().manual_seed(0)
        logs = method.train_step(ka.batch(teacher, 2, gen), gen)
        assert f"reward_{name}" in logs
        return torch.cat([p.detach().flatten() for p in method.generator.parameters()])

    for name in ("hpsv2", "pickscore", "imagereward"):
        assert not torch.equal(generator_after_one_step(name, 1.0), generator_after_one_step(name, 0.0)), name


@pytest.mark.parametrize("name", ["hpsv2", "pickscore", "imagereward"])
def test_each_reward_runs_on_fake_tensors_as_a_plan_runs_it(published, name):
    """The planner runs the reward's forward and backward on fake tensors (shapes only, the prompts' tokens real)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pixsig_distill.fake_step import _Fakes

    reward = _reward(name, published).to("meta")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _Fakes(mode).module(reward)
    with mode:
        images = torch.empty(2, 3, 20, 20).requires_grad_(True)
        reward(images, PROMPTS).sum().backward()
        assert images.grad.shape == images.shape
