"""python -m jfacerec.predict --workdir DIR --data HW2P2_ROOT --out OUT [--split test|dev]

The course's submission files, from a model trained on the HW2P2 layout:

    HW2P2_ROOT/classification/train/<identity>/<image>   training images (dev/: held out, labelled)
    HW2P2_ROOT/classification/test/<image>               images to classify
    HW2P2_ROOT/verification/known/<identity>/<image>     the people to recognise
    HW2P2_ROOT/verification/unknown_dev/<image>          queries, labelled in dev_identities.csv
    HW2P2_ROOT/verification/unknown_test/<image>         queries to label
    HW2P2_ROOT/verification/dev_identities.csv           id,label of unknown_dev

- OUT/classification.csv (`id,label`): the training identity of each image of classification/test/;
- OUT/verification.csv (`id,label`): for each image of verification/unknown_<split>/, the identity
  of verification/known/ it shows, or n000000 for someone not there. The unknown threshold is the
  one that maximises accuracy on verification/unknown_dev against dev_identities.csv.
Dev accuracies are printed and written to OUT/report.json wherever labels exist. Every file is
written atomically: an interrupted run leaves the previous files whole.
"""

from __future__ import annotations

from absl import flags

from jfacerec.core import cli, storage
from jfacerec.evaluation.hw2p2 import predict


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.exit_on_user_error(output=f.out):
        report = predict(f.workdir, f.data, f.out, split=f.split, strict=f.strict)
    for key, value in sorted(report.items()):
        print(f"{key:<28} {value:.4f}" if isinstance(value, float) else f"{key:<28} {value}")
    print(f"wrote {', '.join(storage.listdir(f.out))} in {f.out}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Training workdir of the model.", required=True)
    flags.DEFINE_string("data", None, "Root of the HW2P2 layout.", required=True)
    flags.DEFINE_string("out", None, "Folder for the CSVs and report.json.", required=True)
    flags.DEFINE_enum("split", "test", ["test", "dev"],
                      "Which verification/unknown_<split> folder verification.csv covers.")
    cli.strict_flag()
    cli.run(main)
