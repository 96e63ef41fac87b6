"""Flags shared by the commands that read a config and a workdir.

Commands define their flags when they run (under `if __name__ == "__main__"`), not on import, so
that their modules can be imported side by side.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags


def config_and_workdir_flags(config_help: str, workdir_help: str) -> None:
    """Defines the required --config (overridable as --config.KEY=VALUE) and --workdir."""
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])
