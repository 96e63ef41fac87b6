"""python -m jfacerec.train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Trains, or resumes from the newest checkpoint in DIR.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jfacerec import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    parallel.maybe_initialize_distributed()
    from jfacerec.training import NonFiniteLossError, train  # after distributed init
    logging.set_verbosity(logging.WARNING)
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
