"""The demo's base config (configs/demo.py:base, without the demo's recipe) with another training
objective, one per argument:

python -m jfacerec.train --config configs/demo_losses.py:arcface --workdir workdirs/arcface

Arguments: softmax, center, triplet, sphereface, cosface, arcface (the default), combined, joint
(0.7 * softmax + 0.3 * triplet), explicit_triplet (the course's (anchor, positive, negative)
batches); with "runlocal" for a seconds-long smoke test, e.g. "arcface,runlocal".
"""

import ml_collections

from jfacerec.core import config_base

demo = config_base.sibling(__file__, "demo")

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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_base.parse_arg(arg, __file__, choices=OBJECTIVES, default="arcface")
    c = demo.get_config("runlocal" if "runlocal" in variant else "base")
    choice = OBJECTIVES[variant.choice]
    c.loss.name = choice["name"]
    if "sampler" in choice:
        c.input.sampler = choice["sampler"]
    if c.input.sampler == "triplets":
        c.batch_size = 3 * (c.batch_size // 3 // 8) * 8 if c.batch_size >= 48 else 24
    return c
