"""python -m jfacerec.evaluate --config configs/NAME.py --workdir DIR

Restores the newest checkpoint in DIR and measures both jobs of the model:
- classification (closed set): top-1 / top-5 on held-out images of the training identities;
- verification on identities never trained on: pair ROC AUC, EER, 10-fold accuracy, TAR@FAR,
  and open-set identification against a gallery, "unknown" below a threshold chosen on a disjoint
  validation split.
Writes DIR/eval/metrics.json, roc.png and scores.png, and prints a table.
"""

from __future__ import annotations

from absl import flags

from jfacerec.core import cli, parallel
from jfacerec.core import workdir as workdir_files
from jfacerec.evaluation.evaluator import evaluate, format_table


def main(argv):
    del argv
    parallel.maybe_initialize_distributed()
    workdir = flags.FLAGS.workdir
    with cli.exit_on_user_error(output=workdir):
        results = evaluate(cli.config_from_flags(), workdir)
    print(format_table(results))
    print(f"wrote {workdir_files.path(workdir, workdir_files.EVAL_METRICS)}")


if __name__ == "__main__":
    cli.config_and_workdir_flags("Config file the model was trained with.",
                                 "Training workdir holding checkpoints/.")
    cli.run(main)
