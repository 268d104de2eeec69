"""A tiny CLIP for the toy world, shipped as files and loaded through open_clip's own code.

The shipped model lives in ``weights/clip/`` in the layout open_clip reads for its
``local-dir:`` schema (the layout ``open_clip.push_to_hf_hub`` writes):

* ``open_clip_config.json``: ``{"model_cfg": {...}, "preprocess_cfg": {...}}``; the model
  config is ordinary open_clip model-config JSON (``embed_dim``, ``vision_cfg``,
  ``text_cfg``). Through ``local-dir:`` open_clip also applies ``preprocess_cfg``, so the
  image normalisation (mean = std = 0.5: [0, 1] pixels -> [-1, 1], the range
  ``ToyWorldDataset`` uses) ships with the weights and open_clip's transforms use it.
  Not the name registry: ``open_clip.add_model_config(folder)`` registers each JSON under
  its *file stem* (this file would become "open_clip_config", not "toy-clip") and that
  route ignores ``preprocess_cfg``, leaving open_clip's OpenAI mean/std in the transforms.
* ``open_clip_model.safetensors``: the weights; open_clip loads ``.safetensors`` itself
  (``open_clip.factory.load_state_dict``) and prefers that file name in a folder.
* ``tokenizer.json`` / ``tokenizer_config.json``: a word-level tokenizer over the 28
  caption words, which ``open_clip.get_tokenizer`` loads from the folder as an
  ``HFTokenizer`` because ``text_cfg`` names an ``hf_tokenizer_name``. open_clip's default
  BPE tokenizer would need a 49,408-row embedding table (25 MB at width 128; the weights
  must stay under 8 MB); ours has 31 rows: ``<pad>`` 0, ``<unk>`` 1 (any word outside
  the world), ``<eos>`` 2, then the words. The text tower pools at ``<eos>``.

Architecture: a ViT with 8 px patches (16 tokens). With 4 px patches the model learned
colour, size and background but stayed blind to *where* the object is (the ViT attention
plateau: after 300 steps, 4.3 minutes here, position was at chance); 8 px patches are
about 2x cheaper per step and leave the plateau early (position 99.8 % right in
one-attribute-off pairs after 600 steps).

Images given to the helpers here are float tensors (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from pixsig_distill.toy.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ToyWorldDataset,
    all_scenes,
    caption_vocabulary,
    heldout_captions,
    split_scenes,
)

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")  # ids 0, 1, 2
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2

# [0, 1] pixels -> [-1, 1], the range the toy world's datasets already use.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def toy_clip_config() -> dict:
    """The shipped architecture, in the ``open_clip_config.json`` layout."""
    vocab_size = len(SPECIAL_TOKENS) + len(caption_vocabulary())
    model_cfg = {
        "embed_dim": 128,
        # 8 px patches: see the module docstring.
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
        "text_cfg": {
            "context_length": 16,  # the longest caption is 12 words + <eos>
            "vocab_size": vocab_size,
            "width": 128,
            "heads": 4,
            "layers": 3,
            # Any non-empty name: with ``local-dir:`` open_clip loads the tokenizer files
            # from the model folder itself.
            "hf_tokenizer_name": "toy-clip-wordlevel",
            "pad_id": PAD_ID,
            "eos_id": EOS_ID,
            "pool_type": "eos",
        },
    }
    preprocess_cfg = {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "interpolation": "bicubic", "resize_mode": "squash"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def write_tokenizer(out_dir: str | Path, context_length: int = 16) -> None:
    """Write the word-level tokenizer: ``tokenizer.json`` (the ``tokenizers`` library's
    format) and a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``, a class that
    both transformers 4.x and 5.x resolve (5.x's own ``save_pretrained`` would name a
    class that 4.x lacks)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    out = Path(out_dir)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *caption_vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", EOS_ID)])
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "eos_token": "<eos>",
        "model_max_length": context_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _write_config(out_dir: Path, config: dict) -> None:
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_toy_clip(device: str | torch.device = "cpu", weights_dir: str | Path = WEIGHTS_DIR):
    """Load the toy CLIP with open_clip: ``(model, preprocess, tokenizer)``.

    ``preprocess`` is open_clip's validation transform (PIL image -> normalised tensor);
    ``tokenizer`` maps a caption or list of captions to (B, 16) token ids. The model is
    in eval mode.
    """
    name = f"local-dir:{Path(weights_dir).resolve()}"
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # open_clip logs a dozen INFO lines per load on the root logger
    try:
        # require_pretrained: a folder without weights must fail, not give a random model.
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(name)
    finally:
        logging.disable(previous)
    return model.eval(), preprocess, tokenizer


def prepare_images(model, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) -> the model's input: resized if needed, then normalised
    with the mean/std that open_clip read from the model's ``preprocess_cfg``.
    ``model`` is the CLIP model or its image tower."""
    visual = getattr(model, "visual", model)
    cfg = visual.preprocess_cfg
    size = tuple(visual.image_size)
    images = images.float()
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.tensor(cfg["mean"], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def clip_image_features(model, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings (B, embed_dim) of [0, 1] images (B, 3, H, W)."""
    return model.encode_image(prepare_images(model, images.to(_device(model))), normalize=True)


@torch.no_grad()
def clip_text_features(model, tokenizer, captions: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings (B, embed_dim) of captions."""
    return model.encode_text(tokenizer(list(captions)).to(_device(model)), normalize=True)


# --------------------------------------------------------------------------- training


def _training_batches(batch_size: int, seed: int, hard_fraction: float, resolution: int = 32):
    """Endless batches of distinct training scenes, each rendered with fresh jitter.

    Captions within a batch are distinct, so the contrastive loss has no false negatives
    (a repeated caption would count its own match as wrong). In a random batch almost
    every pair already differs in colour, size or background, so little of the loss
    depends on reading shape or position, the two attributes that need a close look at a
    few pixels. So ``hard_fraction`` of each batch is whole groups of scenes that share
    colour, size and background and differ only in shape and position; the rest is
    uniformly random. Yields ([0, 1] images (B, 3, H, W), scenes).
    """
    scenes = split_scenes("train")
    groups: dict[tuple, list[Scene]] = {}
    for sc in scenes:
        groups.setdefault((sc.colour, sc.size, sc.background), []).append(sc)
    group_list = list(groups.values())
    rng = np.random.default_rng([seed, 0])
    n_hard = round(hard_fraction * batch_size)
    for step in itertools.count():
        batch: list[Scene] = []
        for g in rng.permutation(len(group_list)):
            if len(batch) >= n_hard:
                break
            members = group_list[g]
            batch += [members[i] for i in rng.permutation(len(members))[: n_hard - len(batch)]]
        chosen = set(batch)
        rest = [sc for sc in scenes if sc not in chosen]
        batch += [rest[i] for i in rng.choice(len(rest), size=batch_size - len(batch), replace=False)]
        # Rendering stream: one generator per (seed, step, slot), like ToyWorldDataset's items.
        pixels = [sc.render(resolution, np.random.default_rng([seed, 1, step, j])) for j, sc in enumerate(batch)]
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
        yield images, batch


def _param_groups(model, weight_decay: float, logit_scale_lr_mult: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on gains, biases or the logit
    scale), and a faster learning rate for the logit scale, which otherwise moves only
    about lr per step and would stay near its initial 1/0.07 in a few hundred steps."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name != "logit_scale":
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": [model.logit_scale], "weight_decay": 0.0, "lr_mult": logit_scale_lr_mult},
    ]


def train_toy_clip(
    out_dir: str | Path,
    steps: int = 600,
    batch_size: int = 128,
    seed: int = 0,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 30,
    hard_fraction: float = 0.5,
    logit_scale_lr_mult: float = 10.0,
    log_every: int = 50,
    progress: bool = True,
) -> Path:
    """Train the toy CLIP contrastively on the toy world's training split and save it.

    Symmetric InfoNCE (open_clip's ``ClipLoss``) with the learnable logit scale; AdamW
    with linear warmup and cosine decay. The data are the training-split scenes (those
    of ``ToyWorldDataset("train")``) drawn by ``_training_batches``: distinct captions per
    batch, ``hard_fraction`` of them hard negatives, a fresh render per step.
    Deterministic from ``seed`` for a given machine and thread count. Writes config,
    tokenizer and ``open_clip_model.safetensors`` into ``out_dir`` and returns it; load
    the result with ``load_toy_clip(weights_dir=out_dir)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = toy_clip_config()
    _write_config(out, config)
    write_tokenizer(out, config["model_cfg"]["text_cfg"]["context_length"])
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out.resolve()}")

    torch.manual_seed(seed)  # the weight initialisation
    # load_weights=False: a fresh model even when out_dir already holds weights (open_clip
    # logs that it is "initialized randomly", which is the point here).
    model = open_clip.create_model(f"local-dir:{out.resolve()}", load_weights=False).train()

    loss_fn = open_clip.ClipLoss()
    groups = _param_groups(model, weight_decay, logit_scale_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        return 0.5 * lr * (1 + np.cos(np.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    batches = _training_batches(batch_size, seed, hard_fraction)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="toy clip", disable=not progress)
    for step in bar:
        images, scenes = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step) * group["lr_mult"]
        image_features = model.encode_image(prepare_images(model, images), normalize=True)
        text_features = model.encode_text(tokenizer([sc.caption for sc in scenes]), normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP's cap on the temperature: logits at most 100x cosine
            model.logit_scale.clamp_(0, np.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            logger.info(
                "step %d/%d loss %.4f logit_scale %.1f lr %.2e (%.0fs)",
                step + 1, steps, loss.item(), model.logit_scale.exp().item(), lr_at(step), time.perf_counter() - start,
            )

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    return out


# --------------------------------------------------------------------------- evaluation

_ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}


@lru_cache(maxsize=1)
def _scenes_by_caption() -> dict[str, Scene]:
    return {sc.caption: sc for sc in all_scenes()}


def one_attribute_off(caption: str) -> list[str]:
    """Every caption of the world that differs from ``caption`` in exactly one attribute
    (21 of them: 2 shapes + 6 colours + 2 sizes + 8 positions + 3 backgrounds)."""
    scene = _scenes_by_caption()[caption]
    out = []
    for field, values in _ATTRIBUTES.items():
        for value in values:
            if value != getattr(scene, field):
                out.append(Scene(**{**scene.__dict__, field: value}).caption)
    return out


def _candidate_lists(true_captions: list[str], k: int, distractors: str, seed: int) -> list[list[str]]:
    """Per image: the true caption first, then ``k - 1`` distinct distractors."""
    rng = np.random.default_rng(seed)
    pool = heldout_captions()
    lists = []
    for caption in true_captions:
        if distractors == "random":
            options = [c for c in pool if c != caption]
        elif distractors == "one_attribute":
            options = one_attribute_off(caption)
        else:
            raise ValueError(f"distractors must be 'random' or 'one_attribute', got {distractors!r}")
        picked = rng.choice(len(options), size=k - 1, replace=False)
        lists.append([caption] + [options[i] for i in picked])
    return lists


@torch.no_grad()
def caption_accuracy_hits(
    model,
    tokenizer,
    images: torch.Tensor,
    true_captions: list[str],
    candidates_per_image: int = 10,
    seed: int = 0,
    distractors: str = "random",
    batch_size: int = 256,
) -> np.ndarray:
    """Per image: is its caption the top-1 pick among ``candidates_per_image``? (bool array).

    ``distractors="random"``: the others are distinct held-out captions (the target metric);
    ``"one_attribute"``: captions that differ from the true one in exactly one attribute
    (harder: e.g. "top left" vs "left" is an 8 px shift, a small triangle vs a small
    circle a few pixels of outline). Images: [0, 1], (N, 3, H, W).
    """
    if len(images) != len(true_captions):
        raise ValueError(f"{len(images)} images but {len(true_captions)} captions")
    candidates = _candidate_lists(list(true_captions), candidates_per_image, distractors, seed)
    # Embed every distinct caption once; the candidate lists only index into the table.
    unique = sorted(set(itertools.chain.from_iterable(candidates)))
    index = {c: i for i, c in enumerate(unique)}
    text = torch.cat([clip_text_features(model, tokenizer, unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)])
    hits = []
    for start in range(0, len(images), batch_size):
        feats = clip_image_features(model, images[start : start + batch_size])
        ids = torch.tensor([[index[c] for c in cands] for cands in candidates[start : start + batch_size]], device=feats.device)
        scores = torch.einsum("bd,bkd->bk", feats, text[ids])
        # The true caption is candidate 0; it must beat every distractor strictly (a tie
        # is not a pick).
        hits.append((scores[:, 0] > scores[:, 1:].max(dim=1).values).cpu())
    return torch.cat(hits).numpy()


def caption_accuracy(model, tokenizer, images: torch.Tensor, true_captions: list[str], **kwargs) -> float:
    """Top-1 accuracy of picking each image's caption (``caption_accuracy_hits`` averaged)."""
    return float(caption_accuracy_hits(model, tokenizer, images, true_captions, **kwargs).mean())


def heldout_images(n: int, seed: int = 1) -> tuple[torch.Tensor, list[str]]:
    """``n`` held-out images as [0, 1] tensors (N, 3, 32, 32) with their captions."""
    dataset = ToyWorldDataset("heldout", size=n, seed=seed)
    items = [dataset[i] for i in range(n)]
    return (torch.stack([it["image"] for it in items]) + 1) / 2, [it["caption"] for it in items]
