"""The demo trained with 0.7 * softmax + 0.3 * triplet (configs/demo_losses.py).

Arg "runlocal" shrinks it."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_losses import get_config as objective_config  # noqa: E402


def get_config(arg: str | None = None):
    return objective_config("joint" + (f",{arg}" if arg else ""))
