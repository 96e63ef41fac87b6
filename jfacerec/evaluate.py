"""python -m jfacerec.evaluate --config configs/NAME.py --workdir DIR [--bin lfw.bin,cfp_fp.bin]

Restores the newest checkpoint in DIR and measures both jobs of the model:
- classification (closed set): top-1 / top-5 on held-out images of the training identities;
- verification on identities never trained on: pair ROC AUC, EER, 10-fold accuracy, TAR@FAR,
  and open-set identification against a gallery, "unknown" below a threshold chosen on a disjoint
  validation split;
- with --bin, verification on each .bin set as arcface_torch reports it (10-fold accuracy and its
  std, AUC, EER, TAR@FAR=1e-3 under bin/<set>/..., <set> the file name without .bin).
Writes DIR/eval/metrics.json, roc.png and scores.png (and roc_bin.png), and prints a table.
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
        results = evaluate(cli.config_from_flags(), workdir, flags.FLAGS.bin)
    print(format_table(results))
    print(f"wrote {workdir_files.path(workdir, workdir_files.EVAL_METRICS)}")


if __name__ == "__main__":
    cli.config_and_workdir_flags("Config file the model was trained with.",
                                 "Training workdir holding checkpoints/.")
    flags.DEFINE_list("bin", [], "Verification .bin sets to evaluate on (lfw.bin,cfp_fp.bin): "
                      "insightface's format, or made with python -m jfacerec.data.bin.")
    cli.run(main)
