"""HW2P2 (the course): 7,000 identities, 112-pixel faces, iresnet50 with ArcFace.

JFACEREC_HW2P2=/data/hw2p2 python -m jfacerec.train --config configs/hw2p2_iresnet50.py \
    --workdir workdirs/hw2p2_iresnet50
(`dataset.root` defaults to $JFACEREC_HW2P2, else /data/hw2p2; the layout is
`jfacerec.data.sources.Hw2p2Layout`'s.) "softmax" trains with softmax and label smoothing instead of ArcFace;
"runlocal" (also "softmax,runlocal") shrinks it to synthetic faces and a CPU smoke test.
"""

import os

import ml_collections

from jfacerec.core import config_base

zoo = config_base.sibling(__file__, "zoo")

# The training identities of the course data (the data itself decides; shape checks use this).
NUM_IDENTITIES = 7000


def hw2p2_config(backbone: str, arg: str | None, path: str) -> ml_collections.ConfigDict:
    """The HW2P2 recipe around `backbone`; arg (of the config file `path`): "softmax"
    (label-smoothed softmax instead of ArcFace) and/or "runlocal"."""
    variant = config_base.parse_arg(arg, path, flags=("softmax", "runlocal"))
    c = zoo.get_config(backbone)
    c.image_size = 112
    c.batch_size = 256
    c.total_steps = 30 * 140_000 // 256  # about 30 epochs of the ~140k training faces
    c.checkpoint_every_steps = 2_000
    c.optimizer.update(name="sgd", learning_rate=0.1, warmup_steps=1_000, schedule="cosine",
                       weight_decay=5e-4)
    if "softmax" in variant:
        c.loss.update(name="softmax", label_smoothing=0.1)
    else:
        c.loss.update(name="arcface", label_smoothing=0.0)
        c.loss.arcface.update(scale=64.0, margin=0.5)
    c.dataset = config_base.dataset(
        name="hw2p2", root=os.environ.get("JFACEREC_HW2P2", "/data/hw2p2"), cache=False)
    c.input.augment.update(flip=True, min_scale=0.8, max_aspect_change=0.1)
    if "runlocal" in variant:
        c.image_size = 32
        c.batch_size = 32
        c.total_steps = 20
        c.log_every_steps = 5
        c.checkpoint_every_steps = 10
        c.optimizer.warmup_steps = 5
        c.model.update(width_multiplier=0.25, embedding_dim=64)
        c.dataset = config_base.dataset(
            name="synthetic", seed=0, num_identities=16, train_images=8, test_images=2,
            num_unseen_identities=20, unseen_images=4)
        c.eval.num_pairs = 200
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return hw2p2_config("iresnet50", arg, __file__)
