"""Test set-up: 8 virtual CPU devices (set before JAX starts) and a tiny training config."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; under pytest nobody parses the command line.
flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """The demo config shrunk to seconds: 8 identities, 16-pixel faces, a 4-to-32-channel ResNet."""
    import sys

    sys.path.insert(0, REPO)
    from configs.demo import get_config

    c = get_config("runlocal")
    c.image_size = 16
    c.num_devices = 1
    c.batch_size = 16
    c.total_steps = 30
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    c.optimizer.warmup_steps = 5
    c.dataset.update(num_identities=8, train_images=12, test_images=4, num_unseen_identities=12,
                     unseen_images=4)
    c.eval.update(batch_size=32, num_pairs=60, folds=5)
    for key, value in overrides.items():
        target = c
        *path, leaf = key.split(".")
        for part in path:
            target = target[part]
        target[leaf] = value
    return c


@pytest.fixture
def config():
    return tiny_config()
