"""python -m jfacerec.train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Trains, or resumes from the newest checkpoint in DIR.
"""

from __future__ import annotations


from absl import app, flags, logging

from jfacerec.core import parallel
from jfacerec.core.cli import config_and_workdir_flags, config_from_flags, exit_on_user_error


def main(argv):
    del argv
    parallel.maybe_initialize_distributed()
    from jfacerec.training import NonFiniteLossError, train  # after distributed init
    logging.set_verbosity(logging.WARNING)
    with exit_on_user_error(NonFiniteLossError):
        train(config_from_flags(), flags.FLAGS.workdir)


if __name__ == "__main__":
    config_and_workdir_flags("Training config file.",
                             "Where checkpoints and logs go.")
    app.run(main)
