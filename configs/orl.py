"""AT&T/ORL faces: 40 subjects x 10 grey 92x112 images.

python -m jfacerec.evaluation.orl --config configs/orl.py --workdir workdirs/orl [--splits 10]
Closed set: 5 training and 5 test images per subject, over random splits; open set: 30 known
subjects, 10 unknown. Reported beside an eigenfaces baseline computed in the same run.
"lfw" fine-tunes the LFW recipe's model instead of training from scratch (train it first:
python -m jfacerec.evaluation.lfw --config configs/lfw.py --workdir workdirs/lfw; then
--config configs/orl.py:lfw, or --config.init_from=OTHER/fold_00 for another LFW workdir):
200 steps at 48 px from the faces of 1,262 LFW people (none of them ORL's), the open set matched
after WCCN (eval.wccn). Its closed-set figure is `cnn_templates` (each test face answered by the
nearest subject's mean training embedding after that WCCN): 0.9925 against the head's 0.989,
chosen on held-out training images (--config.dataset.validation_images=1 --noopen_set: 0.980
against 0.9725), never on the test images; benchmarks/README.md, "Real faces: AT&T/ORL".
"runlocal" shrinks it to a smoke test.
"""

import os

import ml_collections

from jfacerec.core import config_base

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_base.parse_arg(arg, __file__, flags=("lfw", config_base.RUNLOCAL))
    c = config_base.base_config()
    data = os.environ.get("JFACEREC_DATA", os.path.join("..", "shared", "data"))
    c.image_size = 32
    c.batch_size = 64
    c.total_steps = 400
    c.checkpoint_every_steps = 400
    c.log_every_steps = 50
    c.model.update(name="resnet_tiny", embedding_dim=64, norm="batch", width_multiplier=0.5)
    c.loss.name = "cosface"
    c.ema.decay = 0.99
    c.optimizer.update(learning_rate=0.1, warmup_steps=20)
    c.dataset = config_base.dataset(
        name="orl", root=os.path.join(data, "att_faces"), split=0, known_identities=40,
        open_set_known=30, train_images=5, crop_fraction=1.0, check=True, strict=False,
        cache=True)
    c.input.augment.update(flip=True, min_scale=0.85, max_aspect_change=0.1, brightness=0.2,
                           contrast=0.2)
    c.eval.update(batch_size=200, flip=True)
    c.eigenfaces.components = 40

    if "runlocal" in variant:
        c.image_size = 16
        c.total_steps = 10
        c.batch_size = 32
        c.log_every_steps = 5
        c.checkpoint_every_steps = 10
        c.model.width_multiplier = 0.25
    if "lfw" in variant:
        # configs/lfw.py's model and face size (its runlocal's for runlocal), without its
        # dropout, under a new head, at a tenth of its learning rate
        lfw = config_base.sibling(__file__, "lfw").get_config(
            config_base.RUNLOCAL if config_base.RUNLOCAL in variant else None)
        c.init_from = os.path.join("workdirs", "lfw", "fold_00")
        c.image_size = lfw.image_size
        c.model = lfw.model
        c.model.dropout = 0.0
        c.optimizer.learning_rate = 0.01
        # the open set matched after lfw.py's WCCN, fitted on the enrolled faces (its shrinkage
        # was chosen on LFW's pairsDevTrain, never on ORL)
        c.eval.wccn = lfw.eval.wccn
        if config_base.RUNLOCAL not in variant:
            c.total_steps = 200
            c.checkpoint_every_steps = 200
    return c
