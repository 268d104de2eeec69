"""OmegaConf resolvers and config checks shared by every entry point."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
TOY_WEIGHTS = PACKAGE_DIR / "toy" / "weights"


def _toy_asset(name: str) -> str:
    """Path of a shipped toy-world asset (`teacher`, `clip`), valid from the source tree or a wheel."""
    return str(TOY_WEIGHTS / name)


if not OmegaConf.has_resolver("toy_asset"):
    OmegaConf.register_new_resolver("toy_asset", _toy_asset)


def check_int(cfg: DictConfig, key: str, low: int, high: int | None = None, hint: str = "") -> int:
    """A config value that must be an integer in [low, high]; anything else → one-line UserError."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise UserError(f"{key}={value!r} is not an integer; {hint or f'use an integer >= {low}'}")
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise UserError(f"{key}={value} is out of range; {hint or f'use an integer in {bounds}'}")
    return value


def build(node: DictConfig, **kwargs):
    """`hydra.utils.instantiate`, but a UserError raised while building stays a UserError (Hydra wraps
    every exception in InstantiationException, which would turn a one-line message into a traceback)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
