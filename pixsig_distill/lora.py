"""LoRA adapters on the PixArt transformer, in peft's own format, checked before they are loaded.

A saved adapter folder holds `adapter_config.json` + `adapter_model.safetensors` (what
`peft.PeftModel.from_pretrained(transformer, folder)` reads) and our `pixsig_lora.json` card with
the LCM sampling settings that `merge_lora` needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError

LORA_CARD = "pixsig_lora.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PixArt-δ's LCM-LoRA targets: attention (self and cross), feed-forward and the adaLN-single linears.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "adaln_single.linear",
                   "adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2")


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"distill.lora_rank={rank!r}; the LoRA rank must be a positive integer (PixArt-δ uses 32)")
    return rank


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float | None = None,
             target_modules=DEFAULT_TARGETS):
    """Wrap `transformer` (in place) in a peft LoRA model; only the adapters are trainable (B = 0 at init)."""
    from peft import LoraConfig, get_peft_model

    check_rank(rank)
    targets = list(target_modules)
    names = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"distill.lora_target_modules: {', '.join(missing)} match no linear layer of the transformer; "
                        f"use names such as {', '.join(DEFAULT_TARGETS[:6])}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0,
                        init_lora_weights="gaussian")
    return get_peft_model(transformer, config)


def save_lora(model, folder: Path, card: dict, scheduler=None) -> Path:
    """The adapter in peft format, its card, and (`scheduler`) the student's own scheduler in `scheduler/`, so that
    merging it into a base later keeps the recipe it was trained for (merge_lora)."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    if scheduler is not None:
        scheduler.save_pretrained(str(folder / "scheduler"))
    (folder / LORA_CARD).write_text(json.dumps(card, indent=1))
    return folder


def read_lora_card(folder: Path) -> dict:
    path = Path(folder).expanduser() / LORA_CARD
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"LoRA card '{path}' is corrupt ({type(err).__name__}: {err}); re-export the adapter") from None
    if not isinstance(card, dict):
        raise UserError(f"LoRA card '{path}' is corrupt (not a JSON object); re-export the adapter")
    return card


def check_lora_folder(folder: Path) -> Path:
    folder = Path(folder).expanduser()
    if not (folder / "adapter_config.json").is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"'{folder}' is not a peft LoRA folder (needs adapter_config.json and {ADAPTER_WEIGHTS}); "
                        f"pass the export/lora folder of an lcm_lora run")
    return folder


def check_lora_fits(transformer: torch.nn.Module, folder: Path) -> None:
    """Every adapter tensor must sit on a linear layer of `transformer` with matching in/out sizes."""
    from safetensors import safe_open

    folder = check_lora_folder(folder)
    modules = dict(transformer.named_modules())
    try:
        adapter = safe_open(str(folder / ADAPTER_WEIGHTS), "pt")
    except Exception as err:  # a truncated or foreign file: safetensors says why in its first line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"LoRA weights '{folder / ADAPTER_WEIGHTS}' are corrupt ({first}); re-export the adapter") \
            from None
    with adapter as f:
        for key in f.keys():
            path, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
            base = modules.get(path)
            if not isinstance(base, torch.nn.Linear):
                raise UserError(f"LoRA '{folder}' does not match this transformer: it adapts '{path}', which the base "
                                f"has no linear layer for; use the base model the adapter was trained on")
            shape = tuple(f.get_slice(key).get_shape())
            size = base.in_features if part.startswith("A") else base.out_features
            if shape[1 if part.startswith("A") else 0] != size:
                raise UserError(f"LoRA '{folder}' does not match this transformer: '{path}' is "
                                f"{base.out_features}×{base.in_features} in the base but the adapter's lora_{part} is "
                                f"{'×'.join(map(str, shape))}; use the base model the adapter was trained on")


def load_lora(transformer: torch.nn.Module, folder: Path):
    """`PeftModel.from_pretrained(transformer, folder)` after `check_lora_fits`; errors in one line."""
    from peft import PeftModel

    check_lora_fits(transformer, folder)
    try:
        return PeftModel.from_pretrained(transformer, str(Path(folder).expanduser()))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"could not load LoRA '{folder}' onto this transformer ({first})") from None
