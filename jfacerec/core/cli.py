"""Flags shared by the commands that read a config and a workdir.

Commands define their flags when they run (under `if __name__ == "__main__"`), not on import, so
that their modules can be imported side by side.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import ml_collections
from absl import flags
from ml_collections import config_flags


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


def config_from_flags() -> ml_collections.ConfigDict:
    """--config with --strict applied to its dataset."""
    config = flags.FLAGS.config
    if flags.FLAGS.strict:
        with config.unlocked():
            config.dataset.strict = True
    return config


@contextlib.contextmanager
def exit_on_user_error(*more: type[Exception]) -> Iterator[None]:
    """A missing file, bad input or bad config (and `more`) ends the command with its message and
    exit status 1, not a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError, *more) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
