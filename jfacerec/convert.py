"""python -m jfacerec.convert torch|onnx FILE --model NAME --workdir DIR [--num_classes N]

Writes a jfacerec workdir from a face model trained elsewhere, which `jfacerec.load(DIR)`, the
evaluate and gallery commands and `--config.init_from=DIR` open like one trained here:

    python -m jfacerec.convert torch backbone.pth --model iresnet50 --workdir workdirs/r50
    python -m jfacerec.convert onnx model.onnx --model iresnet50 --workdir workdirs/r50

torch: an arcface_torch state dict (`backbone.pth`), read without torch and without running the
file's code. onnx: an ONNX export of one of those backbones (BatchNorms folded or not). NAME is one
of iresnet18, iresnet34, iresnet50, iresnet100, mobilefacenet. The workdir holds the backbone and a
classifier of N classes (default 1) initialised from a seed: set N to the number of training
identities of the dataset you evaluate on, since evaluate restores the head it expects.
DIR must not exist or be empty; nothing is written unless the conversion succeeds.
"""

from __future__ import annotations

import time

from absl import app, flags

from jfacerec.core import cli

FORMATS = ("torch", "onnx")


def main(argv):
    if len(argv) != 3 or argv[1] not in FORMATS:
        raise app.UsageError("usage: python -m jfacerec.convert torch|onnx FILE --model NAME "
                             "--workdir DIR")
    f = flags.FLAGS
    if missing := [name for name in ("model", "workdir") if not f[name].value]:
        raise app.UsageError(f"{argv[1]} needs --{', --'.join(missing)}; see --help")
    if f.num_classes < 1:
        raise app.UsageError(f"--num_classes={f.num_classes}: give at least 1 class")
    fmt, path = argv[1], argv[2]
    from jfacerec import interop  # JAX only now: --help and a bad command line answer at once

    start = time.perf_counter()
    convert = interop.convert_torch if fmt == "torch" else interop.convert_onnx
    with cli.exit_on_user_error(output=f.workdir):
        convert(path, f.model, f.workdir, num_classes=f.num_classes, seed=f.seed)
    print(f"converted {path} ({fmt}, {f.model}) into {f.workdir} in "
          f"{time.perf_counter() - start:.1f} s: open it with jfacerec.load({f.workdir!r})")


if __name__ == "__main__":
    flags.DEFINE_string("model", None, "The backbone the file holds: iresnet18, iresnet34, "
                        "iresnet50, iresnet100 or mobilefacenet.")
    flags.DEFINE_string("workdir", None, "The workdir to write (new or empty).")
    flags.DEFINE_integer("num_classes", 1, "Classes of the classifier head written beside the "
                         "backbone (the evaluate command expects its dataset's).")
    flags.DEFINE_integer("seed", 0, "Seed of the classifier head's initialisation.")
    cli.run(main)
