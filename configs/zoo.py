"""Any registered backbone on the synthetic identities, at its native input size.

python -m jfacerec.train --config configs/zoo.py:iresnet50 --workdir workdirs/iresnet50
python -m jfacerec.train --config configs/zoo.py:mobilefacenet,runlocal --workdir /tmp/mbf

The argument names the backbone (default iresnet50). Face backbones (iresnet*, mobilefacenet) take
112x112 crops; the course-style ones (resnet*, mobilenetv2, convnext_*) 224x224. "runlocal" shrinks
any of them to a few CPU minutes: a quarter of the width, 64-pixel faces (32 for resnet_tiny),
fewer identities and steps.
"""

import ml_collections

from jfacerec.core import config_base

# (input size, default norm, optimizer, learning rate) per backbone.
BACKBONES = {
    "resnet_tiny": (32, "group", "sgd", 0.1),
    "resnet18": (224, "group", "sgd", 0.1),
    "resnet34": (224, "group", "sgd", 0.1),
    "resnet50": (224, "group", "sgd", 0.1),
    "iresnet18": (112, "batch", "sgd", 0.1),
    "iresnet34": (112, "batch", "sgd", 0.1),
    "iresnet50": (112, "batch", "sgd", 0.1),
    "iresnet100": (112, "batch", "sgd", 0.1),
    "mobilefacenet": (112, "batch", "sgd", 0.1),
    "mobilenetv2": (224, "batch", "sgd", 0.05),
    "convnext_tiny": (224, "layer", "adamw", 1e-3),
    "convnext_nano": (224, "layer", "adamw", 1e-3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_base.parse_arg(arg, __file__, choices=BACKBONES, default="iresnet50")
    name = variant.choice
    image_size, norm, optimizer, lr = BACKBONES[name]
    c = config_base.base_config()
    c.model.update(name=name, norm=norm, embedding_dim=512, dropblock=0.0)
    c.image_size = image_size
    c.optimizer.update(name=optimizer, learning_rate=lr,
                       weight_decay=5e-4 if optimizer == "sgd" else 0.05)
    c.dataset.update(num_identities=1000, train_images=40, test_images=5)
    c.total_steps = 20_000
    c.checkpoint_every_steps = 2_000
    if "runlocal" in variant:
        c.model.update(width_multiplier=0.25, embedding_dim=128)
        c.image_size = 32 if name == "resnet_tiny" else 64
        c.dataset.update(num_identities=64, train_images=24, test_images=4,
                         num_unseen_identities=40, unseen_images=5)
        c.batch_size = 32
        c.total_steps = 200
        c.log_every_steps = 20
        c.checkpoint_every_steps = 100
        c.optimizer.warmup_steps = 20
        c.eval.num_pairs = 400
    return c
