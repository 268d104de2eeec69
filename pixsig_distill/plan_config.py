"""What a memory plan builds instead of what it must not read or cannot run: each configured object (a `_target_`)
says so itself, with `plan_stand_in(node)` (the node to plan with; None: leave it out) and `plan_note(node)` (a
line for the report). The planner (fake_step.py, plan.py) knows no method's keys."""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf, open_dict


def plannable(cfg: DictConfig) -> DictConfig:
    """A copy of a train config that builds on fake tensors. What a plan cannot model or must not read is replaced
    by what each configured object says: a `_target_` with a `plan_stand_in(node)` gets the node it returns (None:
    left out), e.g. the regression term (it reads teacher pairs from disk), real-image banks (their shapes only),
    8-bit AdamW (CUDA only) and DMD's few-step chain (planned as one step)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.distill = _stood_in(cfg.distill)
    return cfg


def plan_notes(cfg: DictConfig) -> list[str]:
    """What the plan of `cfg` leaves out or approximates, in the words of each configured object that says so (a
    `_target_` with `plan_note(node)`)."""
    notes = [getattr(_target_of(node), "plan_note", lambda node: None)(node) for node in _nodes(cfg.distill)]
    return [note for note in notes if note]


def _nodes(node: DictConfig):
    """`node` and every config node below it, depth first."""
    yield node
    for key in list(node.keys()):
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from _nodes(child)


def _target_of(node: DictConfig):
    if "_target_" not in node or OmegaConf.is_missing(node, "_target_"):
        return None
    from hydra.utils import get_object

    return get_object(str(node._target_))


def _stood_in(node):
    if not isinstance(node, DictConfig):
        return node
    stand_in = getattr(_target_of(node), "plan_stand_in", None)
    if stand_in is not None:
        node = stand_in(node)
        if node is None:
            return None
        node = node if isinstance(node, DictConfig) else OmegaConf.create(node)
    with open_dict(node):
        for key in list(node.keys()):
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                node[key] = _stood_in(child)
    return node
