"""OmegaConf resolvers and config checks shared by every entry point."""

from __future__ import annotations

import functools
import math
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .conf import compose as _compose
from .errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
TOY_WEIGHTS = PACKAGE_DIR / "toy" / "weights"


def _toy_asset(name: str) -> str:
    """Path of a shipped toy-world asset (`teacher`, `clip`), valid from the source tree or a wheel."""
    return str(TOY_WEIGHTS / name)


def _lora_targets() -> list[str]:
    """`${lora_targets:}`: the linears LoRA adapts by default (pixsig_distill/lora.py keeps the one list)."""
    from .lora import DEFAULT_TARGETS

    return list(DEFAULT_TARGETS)


if not OmegaConf.has_resolver("toy_asset"):
    OmegaConf.register_new_resolver("toy_asset", _toy_asset)
if not OmegaConf.has_resolver("lora_targets"):
    OmegaConf.register_new_resolver("lora_targets", _lora_targets)


def check_int(cfg: DictConfig, key: str, low: int, high: int | None = None, hint: str = "") -> int:
    """A config value that must be an integer in [low, high]; anything else → one-line UserError."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise UserError(f"{key}={value!r} is not an integer; {hint or f'use an integer >= {low}'}")
    if value < low or (high is not None and value > high):
        bounds = f"in {low}..{high}" if high is not None else f">= {low}"
        raise UserError(f"{key}={value} is out of range; {hint or f'use an integer {bounds}'}")
    return value


def check_float(cfg: DictConfig, key: str, low: float | None = None, hint: str = "") -> float:
    """A config value that must be a finite number (>= low); anything else → one-line UserError."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{key}={value!r} is not a finite number; {hint or 'use a number such as 4.5'}")
    if low is not None and value < low:
        raise UserError(f"{key}={value} is out of range; {hint or f'use a number >= {low}'}")
    return float(value)


def validate_train_config(cfg: DictConfig, check_resume: bool = True, training: bool = True) -> None:
    """Reject bad values of a `train` config (also what `plan` reads) before anything is loaded, with the fix in the
    message. `training=False`: a plan, which may size a recipe with random-weight stand-ins or fp16 on a CPU."""
    from .config_checks import check_settings_taken, refuse_fp16_on_cpu, refuse_random_weights

    check_int(cfg, "t_bar", 1, 999, "use an integer in 1..999 (the PixArt-Σ DMD recipe uses 400)")
    check_int(cfg, "seed", 0)
    for key in ("train.max_steps", "train.batch_size", "train.grad_accum", "train.log_every",
                "train.sample_every", "train.ckpt_every"):
        check_int(cfg, key, 1)
    if cfg.train.time_budget_min is not None:
        check_float(cfg, "train.time_budget_min", 0, "give minutes, e.g. train.time_budget_min=30, or null for none")
    if cfg.train.mixed_precision not in ("no", "fp16", "bf16"):
        raise UserError(f"train.mixed_precision={cfg.train.mixed_precision!r}; use no, fp16 or bf16")
    from .lr_schedule import check_lr_schedule

    check_lr_schedule(cfg.train.lr_schedule)
    check_settings_taken(cfg)
    if training:
        refuse_random_weights(cfg)
        refuse_fp16_on_cpu(cfg)
    if not check_resume or cfg.resume == "auto":  # auto picks its checkpoint when the run starts
        return
    from .checkpoint import resolve_resume

    resolve_resume(cfg.resume, Path(str(cfg.out_dir)) / "checkpoints")  # a bad resume= path fails before loading


# What a resumed run may change: how long it goes on, how often it logs and saves, where and on how many processes
# it runs (the same global batch: docs/scaling.md) and how it saves memory there (the same computation), what is
# evaluated afterwards, and the optimizers' settings (a new lr is taken, and the log says so: checkpoint.py).
RESUMABLE_CHANGES = ("out_dir", "resume", "device", "eval.", "train.max_steps", "train.time_budget_min",
                     "train.num_workers", "train.log_every", "train.log_with", "train.sample_every", "train.ckpt_every",
                     "train.keep_checkpoints", "train.preview_prompts", "train.gradient_checkpointing",
                     "train.deterministic", "train.batch_size", "train.grad_accum")


def run_fingerprint(cfg: DictConfig) -> dict:
    """The settings that make a run what it is, flat and resolved; every checkpoint records them, and resuming
    with other ones is refused (loop.train). Left out: `RESUMABLE_CHANGES`, the optimizers' settings, and values
    that only follow one of those (`${device}`, `${train.gradient_checkpointing}`). A value that repeats another
    setting (`${t_bar}`, `${toy_asset:teacher}`) counts as what it resolves to, a path inside this package relative
    to it (so an install elsewhere is the same run); an empty group (`distill.rewards: {}`) is a value too."""
    raw = flat_settings(OmegaConf.to_container(cfg, resolve=False), keep_empty=True)
    resolved = flat_settings(OmegaConf.to_container(cfg, resolve=True), keep_empty=True)
    return {key: _portable(value) for key, value in resolved.items()
            if not _resumable(key) and not any(_resumable(source) for source in _references(raw.get(key)))}


def _resumable(key: str) -> bool:
    return key.startswith(RESUMABLE_CHANGES) or "optimizer." in key


def _references(raw) -> list[str]:
    """The settings a raw value interpolates (`${train.gradient_checkpointing}` → that key; resolvers excluded)."""
    return re.findall(r"\$\{([\w.]+)\}", str(raw))


def _portable(value):
    """A path inside this package, relative to it: the shipped toy teacher is the same teacher wherever it lies."""
    if isinstance(value, str) and value.startswith(str(PACKAGE_DIR)):
        return "pixsig_distill" + value[len(str(PACKAGE_DIR)):]
    if isinstance(value, list):
        return [_portable(item) for item in value]
    return value


def fingerprint_changes(recorded: dict, now: dict) -> list[str]:
    """`key: old → new` for every setting both record with another value, and for a group one side has where the
    other has a value (`distill.rewards: {} → {toy_clip}`, `distill.regression: None → {...}`). A key only one
    side has, under a group both have, is a setting only a newer version records: no change."""
    changes = [f"{key}: {recorded[key]} → {now[key]}" for key in sorted(recorded.keys() & now.keys())
               if recorded[key] != now[key]]
    for side, other in ((now, recorded), (recorded, now)):
        groups: dict[str, set] = {}  # a value on the other side → the names under it on this side
        for key in side.keys() - other.keys():
            held = next((p for p in (key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)) if p in other), None)
            if held is not None:
                groups.setdefault(held, set()).add(key[len(held) + 1:].split(".")[0])
        for held, names in sorted(groups.items()):
            group = "{" + ", ".join(sorted(names)) + "}"
            changes.append(f"{held}: {other[held]} → {group}" if side is now else f"{held}: {group} → {other[held]}")
    return changes


def flat_settings(node, prefix: str = "", keep_empty: bool = False) -> dict:
    """A nested config as `a.b.c: value` (lists stay values; `keep_empty`: an empty group stays, as `{}`)."""
    if isinstance(node, dict) and (node or not keep_empty or not prefix):
        return {k: v for key, value in node.items()
                for k, v in flat_settings(value, f"{prefix}{key}.", keep_empty).items()}
    return {prefix[:-1]: node}


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


# One spelling for one idea across the entry points; the old spellings still work, with a line saying so.
ALIASES = {"prompt_file": "prompts", "num_images": "n_images", "num_samples": "n_samples", "outdir": "out_dir",
           "output_dir": "out_dir"}


def one_line_config_errors(config_name: str, needs_values: bool = True, validate=None):
    """Outermost decorator of a Hydra `main`: a command line Hydra cannot compose (an unknown `model=`
    option, a key that does not exist, an override it cannot parse) ends in one line on stderr and
    exit code 2, like a UserError, instead of Hydra's multi-line report; so does an output folder that
    cannot be written (Hydra would create it first and fail with a traceback).

    It composes the config once from the command line before handing over to Hydra; flags (`--help`,
    `-m`, `--cfg job`, ...) and `hydra.*` overrides are left to Hydra itself. Old key spellings
    (`ALIASES`) are rewritten to the current ones first, with a deprecation line. `needs_values=False`: the command
    reads no data, so `???` placeholders (folders) may stay unset. `validate(cfg)`: the command's own checks of its
    values (ranges particular to a setting), run on the composed config before the checks every command shares."""

    def decorate(hydra_main):
        @functools.wraps(hydra_main)
        def wrapper(*args, **kwargs):
            if not args and not kwargs:  # called as a command, not with a config
                sys.argv[1:] = rewrite_aliases(config_name, sys.argv[1:])
                message = compose_error(config_name, sys.argv[1:], needs_values, validate)
                if message:
                    print(f"error: {message}", file=sys.stderr)
                    sys.exit(2)
            return hydra_main(*args, **kwargs)

        return wrapper

    return decorate


def rewrite_aliases(config_name: str, argv: list[str]) -> list[str]:
    """`prompt_file=x` → `prompts=x` (etc.) where the entry point knows the new key and not the old one."""
    if any(arg.startswith("-") for arg in argv) or not any(arg.partition("=")[0] in ALIASES for arg in argv):
        return argv  # nothing to rewrite: no composition (each costs a third of a second)
    try:
        keys = set(_compose(config_name, []).keys())
    except Exception:  # the real error is reported by compose_error
        return argv
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        new = ALIASES.get(key)
        if eq and new and new in keys and key not in keys:
            print(f"warning: {key}= is deprecated; use {new}= (read as {new}={value})", file=sys.stderr)
            arg = f"{new}={value}"
        out.append(arg)
    return out


def closest_keys(cfg: DictConfig, key: str) -> list[str]:
    """Existing config keys that look like `key` (a typo, another entry point's spelling)."""
    import difflib

    flat = []

    def walk(node, prefix: str) -> None:
        for k in node.keys():
            full = f"{prefix}{k}"
            flat.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                walk(child, f"{full}.")

    walk(cfg, "")
    alias = ALIASES.get(key)
    if alias in flat:
        return [alias]
    return difflib.get_close_matches(key, flat, n=1, cutoff=0.6)


def compose_error(config_name: str, argv: list[str], needs_values: bool = True, validate=None) -> str | None:
    """Why Hydra would refuse these overrides, in one line (None if it would not, or if unsure)."""
    if any(arg.startswith("-") for arg in argv):
        return None
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, \
        OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = _compose(config_name, [arg for arg in argv if not arg.lstrip("+~").startswith("hydra/")],
                       hydra_config=True)
    except MissingConfigException as err:
        group, _, name = (err.missing_cfg_file or "").rpartition("/")
        if group and err.options:
            return (f"{group}={name} is not a config option. Available options in '{group}': "
                    f"{', '.join(err.options)}")
        return _one_line(err)
    except OverrideParseException as err:
        key, _, value = str(err.override).partition("=")
        if any(c in value for c in "=[]{}, "):  # e.g. a run folder named after its overrides: a path to quote
            return (f"cannot parse the override '{err.override}': its value has characters Hydra reads as syntax; "
                    f"quote it: '{key}=\"{value}\"'")
        return f"cannot parse the override '{err.override}'; quote the value: '{key}=\"{value}\"'"
    except ConfigCompositionException as err:
        match = re.search(r"Could not override '([^']+)'", str(err))
        if match and "not in struct" in str(err.__cause__ or err):
            key = match.group(1)
            try:
                base = _compose(config_name, [o for o in overrides if o.partition("=")[0].lstrip("+~") != key])
                near = closest_keys(base, key)
            except Exception:
                near = []
            hint = f"did you mean {' or '.join(near)}?" if near else "--cfg job lists every key"
            return f"unknown key '{key}' for {config_name}; {hint}"
        return _one_line(err)
    except (HydraException, OmegaConfBaseException) as err:
        return _one_line(err)
    from .config_checks import launch_config_error

    message = launch_config_error(config_name, argv, cfg) or _validation_error(validate, cfg) or \
        value_type_error(config_name, overrides, cfg)
    if message:
        return message
    if needs_values:  # a `???` the chosen options need (data=images's folder): Hydra would fail deep in instantiate
        missing = [key for key in cfg if key != "hydra" and OmegaConf.is_missing(cfg, key)]
        missing += [full_key for key in cfg if key != "hydra" and isinstance(cfg._get_node(key), DictConfig)
                    for full_key in sorted(OmegaConf.missing_keys(cfg._get_node(key)))]
        if missing:
            return f"{missing[0]} has no value and the chosen options need one; set it: {missing[0]}=..."
    return output_folder_error(cfg)


def _validation_error(validate, cfg: DictConfig) -> str | None:
    """The command's own one-line refusal of these values (None if it takes them, or cannot judge them yet)."""
    if validate is None:
        return None
    try:
        validate(cfg)
    except UserError as err:
        return str(err)
    except Exception:  # noqa: BLE001  (a value it cannot even read: the shared checks below name it)
        return None
    return None


def _is_group(key: str) -> bool:
    """`distill`, `model`, `distill/gan/real_images`, ...: a config group (a folder of conf/), not a value."""
    return (PACKAGE_DIR / "conf" / key.lstrip("+~")).is_dir()


def value_type_error(config_name: str, overrides: list[str], cfg: DictConfig) -> str | None:
    """A value given on the command line that cannot be what its setting holds, by the setting's default: a
    number setting (an integer one) given text, an empty string, a float (for an integer), NaN or infinity, or a
    negative number. One check for every command, before anything is loaded, after the command's own `validate`
    (ranges particular to a setting: `validate_train_config`, ...); the methods check theirs where they are built,
    so the fix named for a negative number is one sure to be taken (0 when that is the default, else the default)."""
    groups = [o for o in overrides if _is_group(o.partition("=")[0])]
    base = None
    for override in overrides:
        key, eq, _ = override.partition("=")
        key = key.lstrip("+~")
        if not eq or _is_group(key) or key.startswith("hydra"):
            continue
        if base is None:
            try:
                base = _compose(config_name, groups)
            except Exception:  # noqa: BLE001  (the group choices themselves are reported by compose_error)
                return None
        default = OmegaConf.select(base, key, default=None, throw_on_resolution_failure=False)
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue  # text, lists, null defaults: checked where the setting is used
        try:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001
            continue
        if value is None or isinstance(value, (list, dict)) or OmegaConf.is_config(value):
            continue  # null turns some settings off (distill.ema_decay=null: no EMA); a list where one is allowed
        wanted = "an integer" if isinstance(default, int) else "a number"
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                isinstance(default, int) and not integral):
            return f"{key}={value!r} is not {wanted}; give {wanted} (the default is {default})"
        if value < 0 <= default and not key.endswith("weight"):  # a loss term's weight may be negative: a penalty
            # Only what is sure to be taken: a range of its own is checked where the setting is read (0 may be out).
            fix = f"{wanted} >= 0 (the default is 0)" if default == 0 else f"{wanted} such as its default, {default}"
            return f"{key}={value} is negative; give {fix}"
    return None


def _concrete_prefix(value) -> str | None:
    """The part of a path setting before its first interpolation (`outputs/train/${...}` → `outputs/train/`)."""
    if value is None:
        return None
    text = str(value)
    return text.split("${", 1)[0] or "."


def writable_folder_error(path: Path) -> str | None:
    """Why `path` cannot become a folder we write into (None if it can): tried by creating it."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".pixsig-write-test"):
            pass
    except (FileExistsError, NotADirectoryError):
        return f"'{path}' is a file, or lies under one"
    except OSError as err:
        return f"{err.strerror or type(err).__name__}"
    return None


def output_folder_error(cfg: DictConfig) -> str | None:
    """An `out_dir` (or Hydra's run folder) that cannot be created or written, checked before Hydra creates it."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    candidates = [("out_dir", raw.get("out_dir")), ("hydra.run.dir", raw.get("hydra", {}).get("run", {}).get("dir"))]
    for key, value in candidates:
        prefix = _concrete_prefix(value)
        if prefix is None:
            continue
        problem = writable_folder_error(Path(prefix).expanduser())
        if problem:
            # an unresolved default (`outputs/${hydra:job.name}/...`) is named by its concrete part, not as a path
            shown = f"='{value}'" if "${" not in str(value) else f" (the default, a folder under '{prefix}')"
            return f"{key}{shown} cannot be created or written ({problem}); choose a writable folder with {key}=..."
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
