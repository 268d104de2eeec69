"""The method contract (pixsig_distill/methods/base.py) is the whole of what the toolkit asks of a method: every
hook the loop, the planner and the sharding code call is in it, every shipped method implements the required ones,
nothing probes for a hook with getattr, and a student's card is checked when it is exported."""

import ast
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class

import pixsig_distill.methods.base as base
from pixsig_distill.errors import UserError
from pixsig_distill.methods.base import CARD_KEYS, Method, check_card

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pixsig_distill"
REQUIRED = ("models", "optimizers", "checkpoint_modules", "prepare", "train_step", "sample", "export")
OPTIONAL = ("decode", "held_modules", "check_engine", "MEMORY_SAVERS")
SHARED = ("unwrap", "prepare_networks", "ema_or_self", "check_optimizer_names")


def _method_classes() -> dict[str, type]:
    classes = {}
    for path in sorted((PACKAGE / "conf" / "distill").glob("*.yaml")):
        node = yaml.safe_load(path.read_text())
        while "_target_" not in node:  # a YAML that only extends another (finetune_lora: finetune's target)
            node = yaml.safe_load((path.parent / f"{node['defaults'][0]}.yaml").read_text())
        classes[path.stem] = get_class(node["_target_"])
    return classes


def test_every_hook_the_toolkit_calls_on_a_method_is_in_the_contract():
    called = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "method":
                called.add(node.attr)
    assert called, "the scan found no calls"
    assert called <= set(REQUIRED + OPTIONAL + SHARED), sorted(called - set(REQUIRED + OPTIONAL + SHARED))
    doc = base.__doc__
    for hook in REQUIRED + OPTIONAL:
        assert f"`{hook}" in doc, f"methods/base.py does not describe {hook}"
        assert hasattr(Method, hook) or hook in Method.__annotations__, hook


@pytest.mark.parametrize("name, cls", sorted(_method_classes().items()))
def test_every_shipped_method_implements_the_required_hooks(name, cls):
    assert issubclass(cls, Method), f"{name}: {cls.__name__} does not subclass methods.base.Method"
    for hook in REQUIRED[2:]:
        assert getattr(cls, hook) is not getattr(Method, hook), f"{name}: {cls.__name__} lacks {hook}()"


def test_no_hook_is_probed_for_with_getattr():
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in sorted(PACKAGE.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
             and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in REQUIRED + OPTIONAL]
    assert not found, found


def test_a_card_without_its_keys_or_with_steps_that_disagree_is_not_exported():
    card = {"method": "x", "num_inference_steps": 2, "guidance_scale": 1.0, "scheduler": "LCMScheduler",
            "eval_steps": [2]}
    check_card(card)
    for key in CARD_KEYS:
        with pytest.raises(ValueError, match=f"lacks {key}"):
            check_card({k: v for k, v in card.items() if k != key})
    with pytest.raises(ValueError, match="timesteps"):
        check_card({**card, "timesteps": [400]})
    with pytest.raises(ValueError, match="eval_steps"):
        check_card({**card, "eval_steps": []})


def test_an_optimizer_named_after_no_network_is_refused_in_one_line():
    class Stray(Method):
        def __init__(self):
            self.models = {"student": torch.nn.Linear(2, 2)}
            self.optimizers = {"generator": torch.optim.SGD(self.models["student"].parameters(), lr=0.1)}

    with pytest.raises(UserError, match="optimizer 'generator' has no network of that name") as err:
        Stray().prepare_networks(accelerator=None, grad_clip=None)
    assert "\n" not in str(err.value)
