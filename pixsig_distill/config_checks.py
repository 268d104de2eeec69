"""Checks of a composed config that need to know what its `_target_`s are, shared by `train` and `plan` (through
`config.validate_train_config`) and run when the command line is read, before anything loads:

* every setting of a configured object is one its target takes (`distill=lcm +distill/rewards=toy_clip` would
  otherwise end in Hydra's report of a TypeError, after the teacher loaded);
* a part with random weights (a class that says `random_weights = True`, such as the reward stand-in of a real
  reward model's size) trains nothing useful: training refuses it unless `sizing_run=true` says the run only
  measures the recipe's memory and speed; a plan takes it;
* `+accelerate=...` (a launch config, which only `accelerate launch` reads) is refused in one line.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from .conf import CONF_DIR, compose as compose_config
from .errors import UserError

HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}


def target_nodes(node, path: str):
    """(path, node, target object) of every config node with a `_target_` under `node` (lists included)."""
    if isinstance(node, DictConfig):
        if "_target_" in node and not OmegaConf.is_missing(node, "_target_"):
            target = _locate(str(node._target_))
            if target is not None:
                yield path, node, target
        for key in list(node.keys()):
            yield from target_nodes(node._get_node(key), f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node._iter_ex(resolve=False)):
            yield from target_nodes(item, f"{path}[{i}]")


def _locate(name: str):
    from hydra.utils import get_object

    try:
        return get_object(name)
    except Exception:  # noqa: BLE001  (a target that does not import is reported when it is built)
        return None


def check_settings_taken(cfg: DictConfig, groups=("model", "distill", "data")) -> None:
    """Every key of a configured object is a parameter of its target (unless the target takes **kwargs)."""
    for group in groups:
        if group not in cfg:
            continue
        for path, node, target in target_nodes(cfg._get_node(group), group):
            try:
                parameters = inspect.signature(target).parameters
            except (TypeError, ValueError):
                continue
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
                continue
            unknown = sorted(set(node.keys()) - HYDRA_KEYS - set(parameters))
            if unknown:
                name = getattr(target, "__qualname__", str(target))
                takers = _options_taking(path, unknown[0])
                fix = (f"drop it, or choose {path.split('.')[0]}={' or '.join(takers)}, which take it" if takers
                       else "drop it")
                raise UserError(f"{path}.{unknown[0]} is not a setting of {path}={_choice(cfg, path)} ({name}); "
                                f"{fix}")


def _choice(cfg: DictConfig, path: str) -> str:
    choice = OmegaConf.select(cfg, f"hydra.runtime.choices.{path}", default=None) if "hydra" in cfg else None
    return str(choice or OmegaConf.select(cfg, f"{path}._target_"))


def _options_taking(path: str, key: str) -> list[str]:
    """The options of the config group `path` (a folder of conf/, e.g. distill) whose target takes `key`."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra


    if "." in path or not (CONF_DIR / path).is_dir():
        return []
    found = []
    for option in sorted((CONF_DIR / path).glob("*.yaml")):
        try:  # inside a Hydra job (train's run) its config module is already the search path
            composed = compose if GlobalHydra.instance().is_initialized() else compose_config
            node = composed("train", overrides=[f"{path}={option.stem}"])[path]
            parameters = inspect.signature(_locate(str(node._target_))).parameters
        except Exception:  # noqa: BLE001
            continue
        if key in parameters:
            found.append(option.stem)
    return found


def random_weight_parts(cfg: DictConfig) -> list[tuple[str, str]]:
    """(path, class name) of every configured part whose class says it has random weights."""
    return [(path, target.__name__) for path, _, target in target_nodes(cfg._get_node("distill"), "distill")
            if getattr(target, "random_weights", False)] if "distill" in cfg else []


def refuse_random_weights(cfg: DictConfig) -> None:
    """Training on a random-weight stand-in optimises noise: refused unless the run says it only sizes a recipe."""
    parts = random_weight_parts(cfg)
    if parts and not cfg.get("sizing_run", False):
        path, name = parts[0]
        raise UserError(f"{path} is {name}, a stand-in with random weights: training on it optimises noise, for "
                        f"hours at real size; replace it with a real model ({path}._target_=...), plan the run "
                        f"with python -m pixsig_distill.plan, or pass sizing_run=true to train it only to measure "
                        f"its memory and speed")


def refuse_fp16_on_cpu(cfg: DictConfig) -> None:
    """accelerate trains an fp16 run on the CPU in float32: a run that says fp16 would not be one."""
    if cfg.train.mixed_precision != "fp16":
        return
    from .teacher import resolve_device

    if resolve_device(str(cfg.device)).type == "cpu":
        raise UserError("train.mixed_precision=fp16 on the CPU: accelerate has no fp16 autocast there and would "
                        "train in float32; use train.mixed_precision=bf16 (CPU autocast) or no, or train on a GPU")


def launch_config_error(config_name: str, argv: list[str], cfg: DictConfig) -> str | None:
    """`+accelerate=deepspeed_zero2` and the like: a config group the command has no place for, added with `+`.
    A launch config (accelerate's, with `distributed_type`) is read by `accelerate launch` only."""

    added = [arg[1:].partition("=") for arg in argv if arg.startswith("+") and "=" in arg]
    added = [(key, value) for key, _, value in added if "/" not in key and "." not in key
             and (CONF_DIR / key).is_dir() and key in cfg]
    if not added:
        return None
    base = compose_config(config_name, [])
    for key, value in added:
        if key in base:
            continue
        path = CONF_DIR / key / f"{value}.yaml"
        if "distributed_type" in cfg[key]:
            how = ("a plan takes the engine and the device count instead: plan.engine=ddp|fsdp2|zero2|zero3 "
                   "plan.gpus=N" if "plan" in base else f"launch with it: accelerate launch --config_file "
                   f"{relative(path)} -m pixsig_distill.{config_name} ...")
            return (f"+{key}={value} is a launch config, which {config_name} does not read (it would run one process "
                    f"and record the config's); {how}")
        return f"+{key}={value}: {config_name} has no {key} settings and would ignore them; drop it"
    return None


def relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def non_finite_remedy(settings: dict, mixed_precision: str) -> str:
    """What to change when a run's gradients or losses turn non-finite, from its own settings (flat, as
    `config.run_fingerprint` records them): a loss weight far beyond any recipe's (|w| > 1e6, whose gradients
    overflow float32), fp16's narrow range (largest value 65504) only in an fp16 run, else the learning rate."""
    weights = {key: value for key, value in settings.items() if key.endswith("weight")
               and isinstance(value, (int, float)) and not isinstance(value, bool)}
    largest = max(weights, key=lambda key: abs(weights[key]), default=None)
    if largest is not None and abs(weights[largest]) > 1e6:
        return (f"{largest}={weights[largest]:g} scales its gradients past float32's range; give it a weight such "
                f"as 1")
    if mixed_precision == "fp16":
        return "use bf16 instead of fp16, whose range ends at 65504, or lower the learning rate"
    return "lower the learning rate or enable gradient clipping"
