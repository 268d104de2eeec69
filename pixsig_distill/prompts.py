"""Where prompts come from: a text file, or the toy world's caption splits by name."""

from __future__ import annotations

from .data import read_prompt_file

NAMED_SETS = ("toy_train", "toy_heldout")


def load_prompts(source: str) -> list[str]:
    """`toy_train` / `toy_heldout` (every caption of that split) or a path to a prompt file."""
    if source in NAMED_SETS:
        from .toy.world import split_scenes

        return [scene.caption for scene in split_scenes(source.removeprefix("toy_"))]
    return read_prompt_file(source)


def prompt_dataset(source: str):
    """Hydra target of `data=toy` / `data=prompts`: prompts encoded by the teacher on the fly."""
    from .data import PromptDataset

    return PromptDataset(prompts=load_prompts(source))
