"""The demo with another training objective, one per argument:

python -m jfacerec.train --config configs/demo_losses.py:arcface --workdir workdirs/arcface

Arguments: softmax, center, triplet, sphereface, cosface, arcface, combined, joint
(0.7 * softmax + 0.3 * triplet), explicit_triplet (the course's (anchor, positive, negative)
batches). Append ",runlocal" for a seconds-long smoke test, e.g. "arcface,runlocal".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo import get_config as demo_config  # noqa: E402

OBJECTIVES = {
    "softmax": dict(name="softmax"),
    "center": dict(name="softmax + 0.01*center"),
    "triplet": dict(name="triplet", sampler="pk"),
    "explicit_triplet": dict(name="triplet", sampler="triplets"),
    "sphereface": dict(name="sphereface"),
    "cosface": dict(name="cosface"),
    "arcface": dict(name="arcface"),
    "combined": dict(name="combined"),
    "joint": dict(name="0.7*softmax + 0.3*triplet", sampler="pk"),
}


def get_config(arg: str = "arcface"):
    name, _, size = (arg or "arcface").partition(",")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    c = demo_config(size or None)
    choice = OBJECTIVES[name]
    c.loss.name = choice["name"]
    c.input.sampler = choice.get("sampler", "random")
    if c.input.sampler == "triplets":
        c.batch_size = 3 * (c.batch_size // 3 // 8) * 8 if c.batch_size >= 48 else 24
    return c
