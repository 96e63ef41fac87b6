"""python -m jfacerec.train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Trains, or resumes from the newest checkpoint in DIR; validates every `eval.every_steps` steps
on `eval.sets` (figures in metrics.jsonl, TensorBoard and DIR/validation.png; the best checkpoint
kept); starts a new run from `init_from`'s weights (a fine-tune). Draws DIR/training.png at the end.
"""

from __future__ import annotations

from absl import flags

from jfacerec.core import cli


def main(argv):
    del argv
    config, workdir = cli.config_from_flags(), flags.FLAGS.workdir
    # JAX is imported only now, so that --help and a bad command line or config answer at once.
    from jfacerec.core import parallel

    parallel.maybe_initialize_distributed()
    import jax

    from jfacerec.evaluation import plots, validation
    from jfacerec.training import NonFiniteLossError, train  # after distributed init
    with cli.exit_on_user_error(NonFiniteLossError, output=workdir):
        train(config, workdir, validation.from_config(config))
        if jax.process_index() == 0:
            plots.training_curves(workdir)


if __name__ == "__main__":
    cli.config_and_workdir_flags("Training config file.", "Where checkpoints and logs go.")
    cli.run(main)
