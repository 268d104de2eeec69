"""A readable console: our header, one progress bar and our log lines; third-party chatter goes to the log file.

diffusers and transformers print through their own stderr handlers (deprecation warnings, "config attributes
were passed ... and will be ignored", their "Loading ..." progress bars), open_clip logs a dozen INFO lines per
model on the root logger, and Python warnings print themselves. After `quiet_console()` all of it is routed to
the logging tree: file handlers (Hydra's job log, a run's train.log) keep all of it from INFO up, console
handlers show only our own loggers' records, plus anyone's errors.
"""

from __future__ import annotations

import logging

OURS = ("pixsig_distill", "evaluation", "__main__")


class OursOnConsole(logging.Filter):
    """Console records: our loggers at their level; third parties (and the root logger) only from ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(OURS) or record.levelno >= logging.ERROR


def quiet_console() -> None:
    """Route third-party output into logging and keep it off the console (idempotent)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()  # their "Loading pipeline components" bars: ours is the one bar
        library.disable_default_handler()
        library.enable_propagation()
        library.set_verbosity(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn → the "py.warnings" logger
    root = logging.getLogger()
    root.setLevel(min(root.level or logging.INFO, logging.INFO))  # INFO and up reach the file handlers
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO)
            if not any(isinstance(f, OursOnConsole) for f in handler.filters):
                handler.addFilter(OursOnConsole())
    _deepspeed_into_logging()


def _deepspeed_into_logging() -> None:
    """DeepSpeed logs through a handler of its own on stdout (its "DeepSpeed" logger does not propagate) and says, as
    it is imported, which accelerator it chose. Under a DeepSpeed launch it is imported here with stdout captured,
    and its records join the logging tree like any third party's: the log file keeps them from INFO, the console
    shows only its errors."""
    import contextlib
    import io
    import os
    import sys

    if "deepspeed" not in sys.modules and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return  # not a DeepSpeed run: not worth its import
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        import deepspeed  # noqa: F401
    deepspeed_logger = logging.getLogger("DeepSpeed")
    for handler in list(deepspeed_logger.handlers):
        deepspeed_logger.removeHandler(handler)
    deepspeed_logger.propagate = True
    deepspeed_logger.setLevel(logging.INFO)
    for line in said.getvalue().splitlines():  # what it said while importing, for the log file
        if line.strip():
            deepspeed_logger.info(line)


def start_process() -> None:
    """What every entry point does first: its CPU thread share (threads.py) and a quiet console."""
    from .threads import configure_threads

    quiet_console()
    configure_threads()


def entry_point(config_name: str, run, needs_values: bool = True, validate=None):
    """The `main()` of a command: compose conf/<config_name>.yaml with the command line and call `run(cfg)`.

    Around it: one-line errors for a command line Hydra cannot compose or values a chosen option still needs
    (`needs_values=False`: the planner, which reads no data), the command's own checks of its values
    (`validate(cfg)`, when the command line is read: before the checks every command shares, so a range particular
    to a setting is the one named), one line and exit code 2 for a UserError, and `start_process()`.
    Hydra names the job (and so the default output folder) after the module `run` lives in."""
    import functools

    import hydra

    from .config import one_line_config_errors
    from .errors import exit_on_user_error

    @functools.wraps(run)  # Hydra reads the job name through __wrapped__: run's module, not this one
    def main(cfg) -> None:
        start_process()
        run(cfg)

    command = one_line_config_errors(config_name, needs_values, validate)(
        hydra.main(version_base="1.3", config_path="pkg://pixsig_distill.conf", config_name=config_name)(
            exit_on_user_error(main)))
    command.validate = validate  # what the command line is checked with (tests/test_fuzz_cli.py)
    return command
