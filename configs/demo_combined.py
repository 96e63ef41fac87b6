"""The demo trained with the combined objective (see configs/demo_losses.py); arg "runlocal" shrinks it."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_losses import get_config as objective_config  # noqa: E402


def get_config(arg: str | None = None):
    return objective_config("combined" + (f",{arg}" if arg else ""))
