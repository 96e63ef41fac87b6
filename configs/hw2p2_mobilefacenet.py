"""HW2P2 (the course) with MobileFaceNet: the recipe of configs/hw2p2_iresnet50.py.

python -m jfacerec.train --config configs/hw2p2_mobilefacenet.py --workdir workdirs/hw2p2_mbf
Arguments as there: "softmax" (label-smoothed softmax instead of ArcFace), "runlocal".
"""

import ml_collections

from jfacerec.core import config_base

hw2p2 = config_base.sibling(__file__, "hw2p2_iresnet50")
NUM_IDENTITIES = hw2p2.NUM_IDENTITIES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return hw2p2.hw2p2_config("mobilefacenet", arg, __file__)
