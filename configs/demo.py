"""The demo: a small ResNet trained from scratch on synthetic identities, CPU minutes.

python -m jfacerec.train --config configs/demo.py --workdir /tmp/demo
python -m jfacerec.evaluate --config configs/demo.py --workdir /tmp/demo

The base config (jfacerec/core/config_base.py, where every default is written) with the recipe's
changes (benchmarks/README.md, "The demo recipe"): 800 training identities of 20 images rather
than 100 of 64 (more people, not more pictures of each, is what carries over to the unseen ones),
BatchNorm, 2,500 steps and a moving average of the weights. "base" is the base config alone (the
demo before its recipe, which benchmarks/norms.py and configs/demo_losses.py compare on);
"runlocal" is the base config shrunk to a seconds-long smoke test, without the recipe: the tests
build on it.
"""

import ml_collections

from jfacerec.core import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_base.parse_arg(arg, __file__, choices=("base",))
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
    if variant.choice == "base":
        return c
    c.total_steps = 2500
    c.optimizer.warmup_steps = 200
    c.model.norm = "batch"
    c.ema.decay = 0.999
    c.dataset.update(num_identities=800, train_images=20)
    return c
