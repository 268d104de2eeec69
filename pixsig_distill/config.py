"""OmegaConf resolvers and config checks shared by every entry point."""

from __future__ import annotations

import functools
import math
import sys
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


def check_float(cfg: DictConfig, key: str, low: float | None = None, hint: str = "") -> float:
    """A config value that must be a finite number (>= low); anything else → one-line UserError."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{key}={value!r} is not a finite number; {hint or 'use a number such as 4.5'}")
    if low is not None and value < low:
        raise UserError(f"{key}={value} is out of range; {hint or f'use a number >= {low}'}")
    return float(value)


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


def one_line_config_errors(config_name: str):
    """Outermost decorator of a Hydra `main`: a command line Hydra cannot compose (an unknown `model=`
    option, a key that does not exist, an override it cannot parse) ends in one line on stderr and
    exit code 2, like a UserError, instead of Hydra's multi-line report.

    It composes the config once from the command line before handing over to Hydra; flags (`--help`,
    `-m`, `--cfg job`, ...) and `hydra.*` overrides are left to Hydra itself."""

    def decorate(hydra_main):
        @functools.wraps(hydra_main)
        def wrapper(*args, **kwargs):
            if not args and not kwargs:  # called as a command, not with a config
                message = compose_error(config_name, sys.argv[1:])
                if message:
                    print(f"error: {message}", file=sys.stderr)
                    sys.exit(2)
            return hydra_main(*args, **kwargs)

        return wrapper

    return decorate


def compose_error(config_name: str, argv: list[str]) -> str | None:
    """Why Hydra would refuse these overrides, in one line (None if it would not, or if unsure)."""
    if any(arg.startswith("-") for arg in argv):
        return None
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            compose(config_name, overrides=overrides)
    except MissingConfigException as err:
        group, _, name = (err.missing_cfg_file or "").rpartition("/")
        if group and err.options:
            return (f"{group}={name} is not a config option. Available options in '{group}': "
                    f"{', '.join(err.options)}")
        return _one_line(err)
    except OverrideParseException as err:
        return f"cannot parse the override '{err.override}': {_one_line(err)}"
    except (HydraException, OmegaConfBaseException) as err:
        return _one_line(err)
    return None


def _one_line(err: Exception) -> str:
    lines = []
    cause = str(err.__cause__).splitlines()[:1] if err.__cause__ is not None else []
    for line in str(err).splitlines()[:1] + cause + str(err).splitlines()[1:]:
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line and not line.startswith(("full_key:", "object_type=", "reference_type=", "See https://hydra.cc")):
            lines.append(line.rstrip("."))
    return "; ".join(lines) or type(err).__name__
