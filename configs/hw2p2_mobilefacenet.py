"""HW2P2 (the course) with MobileFaceNet: the recipe of configs/hw2p2_iresnet50.py.

python -m jfacerec.train --config configs/hw2p2_mobilefacenet.py --workdir workdirs/hw2p2_mbf
Arguments as there: "softmax" (label-smoothed softmax instead of ArcFace), "runlocal".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hw2p2_iresnet50 import NUM_IDENTITIES, hw2p2_config  # noqa: E402,F401


def get_config(arg: str | None = None):
    return hw2p2_config("mobilefacenet", arg)
