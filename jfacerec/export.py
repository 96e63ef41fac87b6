"""python -m jfacerec.export onnx --workdir DIR --out FILE.onnx [--step N]

A trained model as an ONNX file that onnxruntime and insightface's ArcFaceONNX run as they run
insightface's own recognition models: input `data`, float32 [batch, 3, size, size] of RGB pixels
normalised as (x - 127.5) / 127.5 (size: the workdir's image_size; the batch is dynamic); output
`embedding`, float32 [batch, embedding_dim], without flip and before L2 normalisation. The file is
checked with onnx.checker and written atomically. The graph is built in
jfacerec/interop/onnx_export.py.
"""

from __future__ import annotations

from absl import app, flags

from jfacerec.core import cli
from jfacerec.interop.onnx_export import INPUT_NAME, NORMALIZATION, OUTPUT_NAME, export_workdir


def main(argv):
    if len(argv) != 2 or argv[1] != "onnx":
        raise app.UsageError("usage: python -m jfacerec.export onnx --workdir DIR --out FILE.onnx")
    f = flags.FLAGS
    with cli.exit_on_user_error(output=f.out):
        e = export_workdir(f.workdir, f.out, step=f.step)
    print(f"exported {e.model_name} (step {e.step}) to {e.out}: input {INPUT_NAME} float32 "
          f"[batch, 3, {e.image_size}, {e.image_size}] normalised as {NORMALIZATION}; output "
          f"{OUTPUT_NAME} float32 [batch, {e.embedding_dim}]")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Training workdir of the model.", required=True)
    flags.DEFINE_string("out", None, "The .onnx file to write.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest intact).")
    cli.run(main)
