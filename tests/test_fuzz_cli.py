"""Property-based fuzz of every command's number settings: whatever wrong type, empty string, unicode text,
non-finite or negative value a user types, the command ends with exit code 2 and one `error:` line on stderr,
before anything is loaded, and never with a traceback (config.value_type_error, and Hydra's own parse errors
through config.compose_error)."""

import re
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from test_bad_input import MAINS

COMMANDS = {**MAINS, "plan": "pixsig_distill.plan", "demo": "pixsig_distill.demo"}


def number_keys(config_name: str) -> list[tuple[str, object]]:
    """(key, default) of every integer or float setting of a command's config."""
    from pixsig_distill.config import _compose

    found = []

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "hydra":
                    walk(value, f"{prefix}{key}.")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            found.append((prefix[:-1], node))

    walk(OmegaConf.to_container(_compose(config_name, []), resolve=False), "")
    return found


CONFIG_NAMES = {"train": "train", "generate": "generate", "cache_text": "cache_text", "make_pairs": "make_pairs",
                "leaderboard": "leaderboard", "plan": "plan", "demo": "demo"}  # merge_lora has no number settings

# Text Hydra reads as a string (not a number, bool, null, list or interpolation), unicode included.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                             blacklist_characters="=[]{}(),'\"\\$:~+#*?"), min_size=1, max_size=8).filter(
    lambda s: s.lower() not in ("null", "true", "false", "nan", "inf", "+inf", "-inf", "none")
    and not _is_number(s))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def bad_values(key: str, default) -> st.SearchStrategy[str]:
    """What a user might mistype for a number setting: text, an empty string, NaN/inf, a negative number, and for
    an integer setting a fraction."""
    options = [TEXT, st.just(""), st.sampled_from(["nan", "inf", "-inf"]),
               st.integers(max_value=-1).map(str)]
    if isinstance(default, int) or not key.endswith("weight"):  # a loss term's weight may be negative
        options.append(st.floats(max_value=-0.001, allow_nan=False, allow_infinity=False).map(repr))
    if isinstance(default, int):
        options.append(st.floats(min_value=0.01, max_value=1e6).filter(lambda v: not v.is_integer()).map(repr))
    return st.one_of(options)


# The value a range message names as the fix: `>= 1`, `in 1..999`, `at least 2`, `such as its default, 2e-05`. A
# generic "give an integer >= 0" checked before a setting's own range once sent train.max_steps=-1 to a 0 refused too.
NAMED_FIX = re.compile(r">= (-?[\d.]+(?:e[+-]?\d+)?)|in (-?\d+)\.\.|at least (\d+)"
                       r"|such as its default, (-?[\d.]+(?:e[+-]?\d+)?)")


@pytest.mark.parametrize("entry", list(CONFIG_NAMES))
def test_a_mistyped_number_is_one_line_and_exit_code_2(entry, tmp_path_factory):
    """... and a negative number's message names a value to use instead that is taken."""
    from pixsig_distill.config import compose_error

    keys = number_keys(CONFIG_NAMES[entry])
    assert keys, entry
    module = __import__(COMMANDS[entry], fromlist=["main"])
    out = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(data=st.data())
    def one_case(data):
        key, default = data.draw(st.sampled_from(keys), label="key")
        value = data.draw(bad_values(key, default), label="value")
        argv = [entry, f"{key}={value}", f"out_dir={out / 'run'}", f"hydra.run.dir={out}"]
        if entry == "demo":  # the demo writes nothing: it has no out_dir
            argv.remove(f"out_dir={out / 'run'}")
        saved, sys.argv = sys.argv, argv
        captured = _Capture()
        try:
            with captured:
                module.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:
            sys.argv = saved
        assert code == 2, (argv, captured.err[-2000:])
        assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), (argv, captured.err)
        assert "Traceback" not in captured.err
        fix = NAMED_FIX.search(captured.err)
        if fix and re.fullmatch(r"-\d+", value):  # the value a negative number's message names is taken
            named = next(group for group in fix.groups() if group is not None)
            others = [arg.replace(str(out / "run"), str(out / "fix")) for arg in argv[2:]]  # a folder it may make
            again = compose_error(CONFIG_NAMES[entry], [f"{key}={named}", *others], needs_values=False,
                                  validate=module.main.validate)
            assert again is None or not again.startswith(f"{key}="), (captured.err, again)

    one_case()
    assert not (out / "run").exists()


class _Capture:
    """stderr of one example (capsys cannot be reset between hypothesis examples)."""

    def __enter__(self):
        import io

        self._saved, sys.stderr = sys.stderr, io.StringIO()
        return self

    def __exit__(self, *exc):
        self.err, sys.stderr = sys.stderr.getvalue(), self._saved
        return False

