"""The demo: a small ResNet trained from scratch on synthetic identities, CPU minutes.

python -m jfacerec.train --config configs/demo.py --workdir /tmp/demo
python -m jfacerec.evaluate --config configs/demo.py --workdir /tmp/demo

It is the base config (jfacerec/core/config_base.py, where every default is written); "runlocal"
shrinks it to a seconds-long smoke test.
"""

import ml_collections

from jfacerec.core import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_base.parse_arg(arg, __file__)
    c = config_base.base_config()
    if "runlocal" in variant:  # seconds, for a smoke test
        c.total_steps = 20
        c.log_every_steps = 5
        c.checkpoint_every_steps = 10
        c.batch_size = 32
        c.model.width_multiplier = 0.25
        c.dataset.update(num_identities=16, train_images=8, test_images=2,
                         num_unseen_identities=20, unseen_images=4)
    return c
