"""HW2P2 (the course): 7,000 identities, 112-pixel faces, iresnet50 with ArcFace.

JFACEREC_HW2P2=/data/hw2p2 python -m jfacerec.train --config configs/hw2p2_iresnet50.py \
    --workdir workdirs/hw2p2_iresnet50
(`dataset.root` defaults to $JFACEREC_HW2P2, else /data/hw2p2; the layout is in
../shared/ARCHITECTURE.md.) "softmax" trains with softmax and label smoothing instead of ArcFace;
"runlocal" (also "softmax,runlocal") shrinks it to synthetic faces and a CPU smoke test.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from zoo import get_config as zoo_config  # noqa: E402

# The training identities of the course data (the data itself decides; shape checks use this).
NUM_IDENTITIES = 7000


def hw2p2_config(backbone: str, arg: str | None) -> ml_collections.ConfigDict:
    """The HW2P2 recipe around `backbone`; arg: "", "softmax", "runlocal" or "softmax,runlocal"."""
    parts = set((arg or "").split(",")) - {""}
    if parts - {"softmax", "runlocal"}:
        raise ValueError(f"unknown arguments {sorted(parts - {'softmax', 'runlocal'})}; "
                         f"use 'softmax' and/or 'runlocal'")
    c = zoo_config(backbone)
    c.image_size = 112
    c.batch_size = 256
    c.total_steps = 30 * 140_000 // 256  # about 30 epochs of the ~140k training faces
    c.checkpoint_every_steps = 2_000
    c.optimizer.update(name="sgd", learning_rate=0.1, warmup_steps=1_000, schedule="cosine",
                       weight_decay=5e-4)
    if "softmax" in parts:
        c.loss.update(name="softmax", label_smoothing=0.1)
    else:
        c.loss.update(name="arcface", label_smoothing=0.0)
        c.loss.arcface.update(scale=64.0, margin=0.5)
    c.dataset = ml_collections.ConfigDict(dict(
        name="hw2p2", root=os.environ.get("JFACEREC_HW2P2", "/data/hw2p2"), cache=False))
    c.input.augment.update(flip=True, min_scale=0.8, max_aspect_change=0.1)
    if "runlocal" in parts:
        c.image_size = 32
        c.batch_size = 32
        c.total_steps = 20
        c.log_every_steps = 5
        c.checkpoint_every_steps = 10
        c.optimizer.warmup_steps = 5
        c.model.update(width_multiplier=0.25, embedding_dim=64)
        c.dataset = ml_collections.ConfigDict(dict(
            name="synthetic", seed=0, num_identities=16, train_images=8, test_images=2,
            num_unseen_identities=20, unseen_images=4))
        c.eval.num_pairs = 200
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return hw2p2_config("iresnet50", arg)
