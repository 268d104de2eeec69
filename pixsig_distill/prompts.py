"""Where prompts come from: a text file, or a named set from conf/prompt_sets.yaml (the toy world's splits)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .data import read_prompt_file

PROMPT_SETS = Path(__file__).resolve().parent / "conf" / "prompt_sets.yaml"


@lru_cache(maxsize=1)
def named_sets() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(PROMPT_SETS))


def load_prompts(source: str) -> list[str]:
    """A named set (every caption of that split, for the toy world) or a path to a prompt file."""
    if source in named_sets():
        from hydra.utils import instantiate

        return list(instantiate(named_sets()[source]))
    return read_prompt_file(source)


def prompt_dataset(source: str):
    """Hydra target of `data=toy` / `data=prompts`: prompts encoded by the teacher on the fly."""
    from .data import PromptDataset

    return PromptDataset(prompts=load_prompts(source))
