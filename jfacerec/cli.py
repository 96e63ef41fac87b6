"""Flags shared by the commands that read a config and a workdir."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags


def config_and_workdir_flags(config_help: str, workdir_help: str):
    """Defines the required --config (overridable as --config.KEY=VALUE) and --workdir."""
    config = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])
    return config, workdir
