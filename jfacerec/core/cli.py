"""The commands' shared command line: flags, parsing, and errors as one line.

Commands define their flags when they run (under `if __name__ == "__main__"`), not on import, so
that their modules can be imported side by side, and start with `run(main)` instead of absl's
`app.run`. Every mistake a person can fix (a bad flag, config key or value, a missing or unreadable
file, a full disk) then ends the command with one line, `error: ...`, that names the fix, and exit
status 2 for a usage error (the command line or the config) or 1 for bad input; `--verbose` shows
the traceback and the libraries' logs instead.
"""

from __future__ import annotations

import contextlib
import errno
import numbers
import os
import re
import sys
from typing import Any, Callable, Iterator, NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

INPUT_ERROR = 1
USAGE_ERROR = 2

# What flag parsing raises for a bad command line: absl's own errors, and whatever reading the
# config file and applying --config.KEY=VALUE to it raises (an unknown key is an AttributeError or
# KeyError; an exception inside the config file comes back as a ValueError with its traceback).
_PARSE_ERRORS = (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError)

# Keys that count or size something: zero or less would train nothing (total_steps), divide by
# zero mid-run (checkpoint_every_steps, log_every_steps) or fail deep in a library.
POSITIVE_INTS = ("total_steps", "batch_size", "image_size", "checkpoint_every_steps",
                 "log_every_steps", "keep_checkpoints")

# Writing failures a person fixes outside the program, each with the fix.
_WRITE_FIXES = {
    errno.ENOSPC: "no space left on the device of {path}: free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded writing {path}: free some space or write elsewhere",
    errno.EROFS: "{path} is on a read-only file system: write elsewhere",
    errno.EACCES: "permission denied for {path}: change its permissions or write elsewhere",
}


def config_and_workdir_flags(config_help: str, workdir_help: str) -> None:
    """Defines the required --config (overridable as --config.KEY=VALUE), --workdir and
    --strict."""
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    strict_flag()
    flags.mark_flags_as_required(["config", "workdir"])


def strict_flag() -> None:
    flags.DEFINE_bool("strict", False, "Stop at the first unreadable image file instead of "
                      "skipping it with a warning.")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first of POSITIVE_INTS (where present) that is not a positive
    integer, so that a bad value fails before anything runs or is written."""
    for key in POSITIVE_INTS:
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                              or value <= 0):
            raise ValueError(f"--config.{key}={value}: {key} must be a positive integer; set it "
                             f"in the config file or with --config.{key}=N")


def config_from_flags() -> ml_collections.ConfigDict:
    """--config, checked by validate_config (a usage error), with --strict applied to its
    dataset."""
    config = flags.FLAGS.config
    try:
        validate_config(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if flags.FLAGS.strict:
        with config.unlocked():
            config.dataset.strict = True
    return config


def _fail(message: str, status: int = INPUT_ERROR) -> NoReturn:
    """Ends the command with `error: message` on one line."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(status)


def _verbose() -> bool:
    """--verbose, where the running command defines it (and False in a library or a test)."""
    return "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.verbose


def _write_error(e: Exception, output: str | None) -> str | None:
    """The one-line message of a writing failure in _WRITE_FIXES, or None for another error. An
    OSError carries its errno; tensorstore (orbax's array writer) raises a ValueError that ends
    with "[os_error_code='28']"."""
    code = e.errno if isinstance(e, OSError) else None
    path = e.filename if isinstance(e, OSError) else None
    if code is None and (match := re.search(r"os_error_code='(\d+)'", str(e))):
        code = int(match[1])
        path = (re.findall(r'"(/[^"]+)"', str(e)) or [None])[0]
    if code not in _WRITE_FIXES:
        return None
    return _WRITE_FIXES[code].format(path=path or output or "the output")


@contextlib.contextmanager
def exit_on_user_error(*more: type[Exception], output: str | None = None) -> Iterator[None]:
    """A missing file, bad input or bad config (and `more`), or a full, read-only or forbidden
    disk, ends the command with one line and exit status 1, not a traceback (--verbose: the
    traceback). `output`: what the command writes, named when a writing error names no file."""
    try:
        yield
    except (FileNotFoundError, ValueError, *more) as e:
        if _verbose():
            raise
        _fail(_write_error(e, output) or str(e) or type(e).__name__)
    except OSError as e:
        message = _write_error(e, output)
        if message is None or _verbose():
            raise
        _fail(message)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value given to --name in argv (`--name=V` or `--name V`), before flags are parsed."""
    for i, arg in enumerate(argv[1:], 1):
        if match := re.fullmatch(rf"--?{name}(=(.*))?", arg):
            return match[2] if match[1] else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _check_config_file(argv: list[str]) -> None:
    """config_flags defers a missing config file's error until the config is first used (or an
    override trips on it): name it now."""
    value = _flag_value(argv, "config") if "config" in flags.FLAGS else None
    path = value.split(":", 1)[0] if value else None
    if path and not os.path.isfile(path):
        _fail(f"--config {value}: no such file {path}; pass a config file such as "
              f"configs/demo.py", USAGE_ERROR)


def _unknown_key_message(e: Exception, argv: list[str]) -> str:
    """--config.KEY=VALUE for a KEY the config lacks: ml_collections raises
    AttributeError(KeyError("'KEY'\nDid you mean ...?")), naming neither the flag nor the file."""
    reason: object = e
    while isinstance(reason, BaseException) and reason.args:
        reason = reason.args[0]
    key, *hint = str(reason).strip().splitlines()
    key = key.strip("'\"")
    overrides = [m[1] for arg in argv if (m := re.match(r"--?(?:no)?config\.([\w.-]+)", arg))]
    path = next((o for o in overrides if key in o.split(".")), key)
    suggestion = f" ({hint[0].strip()})" if hint else ""
    return (f"--config.{path}: the config has no key '{key}'{suggestion}; see the keys in "
            f"{_flag_value(argv, 'config') or 'the config file'}")


def _parse_error_message(e: Exception, argv: list[str]) -> str:
    """One line for an error raised while parsing the command line."""
    if isinstance(e, (AttributeError, KeyError)):
        return _unknown_key_message(e, argv)
    lines = [line for line in str(e).splitlines() if line.strip()]
    first = lines[0].removeprefix("flag ") if lines else type(e).__name__
    if len(lines) > 1:  # raised in the config file: "flag --config=...: ...", its traceback
        reason = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
        return f"{first.split(': ')[0]}: {reason}"
    if match := re.search(r"Flag (--\S+) must have a value other than None", first):
        return f"{match[1]} is required; see --help"
    return f"{first}; see --help"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with each usage error as one line (exit status 2) and the help
    flags, which absl ends with status 1, ending with 0."""
    _check_config_file(argv)
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:  # only the help flags exit while parsing
        sys.exit(0 if e.code == 1 else e.code)
    except _PARSE_ERRORS as e:
        if any(re.fullmatch(r"--?verbose(=(true|1))?", arg) for arg in argv):
            raise
        _fail(_parse_error_message(e, argv), USAGE_ERROR)


def _quiet_closed_loops(unraisable: Any) -> None:
    """sys.unraisablehook that drops asyncio's "Event loop is closed": when one of orbax's
    parallel array writes fails (a full disk), orbax closes its event loop while tensorstore
    still completes the others, and each completion would print a traceback under the error
    line."""
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def _main_with_usage_errors(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
    """main(argv), with the libraries' logs (and stray tracebacks of their threads) shown only
    under --verbose, and app.UsageError as one line (absl would print the module's docstring
    with it) and exit status 2."""
    logging.set_verbosity(logging.WARNING if _verbose() else logging.FATAL)
    if not _verbose():
        sys.unraisablehook = _quiet_closed_loops
    try:
        return main(argv)
    except app.UsageError as e:
        if _verbose():
            raise
        _fail(str(e), USAGE_ERROR)


def run(main: Callable[[list[str]], Any]) -> None:
    """absl's app.run(main) for a command: defines --verbose, and makes every usage error one
    line."""
    flags.DEFINE_bool("verbose", False, "Show an error's traceback and the libraries' logs.")
    for flag in flags.FLAGS.get_flags_for_module(__name__):  # --help lists the main module's
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(lambda argv: _main_with_usage_errors(main, argv), flags_parser=_parse_flags)
