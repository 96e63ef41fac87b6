"""python -m jfacerec.evaluate --config configs/NAME.py --workdir DIR

Restores the newest checkpoint in DIR and measures both jobs of the model:
- classification (closed set): top-1 / top-5 on held-out images of the training identities;
- verification on identities never trained on: pair ROC AUC, EER, 10-fold accuracy, TAR@FAR,
  and open-set identification against a gallery, "unknown" below a threshold chosen on a disjoint
  validation split.
Writes DIR/eval/metrics.json, roc.png and scores.png, and prints a table.
"""

from __future__ import annotations

from absl import app, flags, logging

from jfacerec.core import parallel
from jfacerec.core import workdir as workdir_files
from jfacerec.core.cli import config_and_workdir_flags, config_from_flags, exit_on_user_error
from jfacerec.evaluation.evaluator import evaluate, format_table


def main(argv):
    del argv
    parallel.maybe_initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    with exit_on_user_error():
        results = evaluate(config_from_flags(), flags.FLAGS.workdir)
    print(format_table(results))
    print(f"wrote {workdir_files.path(flags.FLAGS.workdir, workdir_files.EVAL_METRICS)}")


if __name__ == "__main__":
    config_and_workdir_flags("Config file the model was trained with.",
                             "Training workdir holding checkpoints/.")
    app.run(main)
