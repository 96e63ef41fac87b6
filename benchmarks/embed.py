"""Embedding speed on the CPU: jfacerec.load(W).embed against PyTorch and ONNX Runtime.

python benchmarks/embed.py [--models iresnet50,mobilefacenet] [--batch 64] [--repeats 5]
    [--sides jfacerec_float32,jfacerec_bfloat16,torch_float32,torch_bf16_autocast,onnxruntime]

One set of weights per backbone for every side: arcface_torch's architecture in PyTorch
(tests/arcface_torch_models.py) with random weights and BatchNorm statistics, saved with
torch.save, converted by `jfacerec.convert torch` into a workdir (float32, and a copy whose config
computes in bfloat16) and exported from it by `jfacerec.export onnx`. Each side embeds the same
batch of 112x112 faces:
- jfacerec_*: `jfacerec.load(W).embed(uint8 [batch, 112, 112, 3])`, flip off: the public call,
  normalisation and batching included, the forward jitted.
- torch_*: the nn.Module in eval mode under `torch.inference_mode`, channels_last, on the batch
  already normalised (NCHW float32); bf16 through `torch.autocast("cpu", torch.bfloat16)`.
- onnxruntime: an InferenceSession of the exported file on the normalised batch.
Calls of all sides alternate, so load from other processes falls on each alike; the figure is the
median over --repeats calls after one warm-up. Before timing, the float32 sides' embeddings are
checked against each other (cosine > 0.9999).

MFU: the backbone's FLOPs per image (XLA's cost analysis of the forward) x images/s, over the
peak of a 2048^3 matmul measured in the same run in float32 and in bfloat16, in JAX and in torch
(this CPU has AMX-BF16: torch's bf16 matmul is several times JAX's); each side's MFU is given
against the best float32 and the best bf16 peak.

Last line: JSON with "images_per_second": {MODEL: {SIDE: float}}, the peaks and the MFUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from common import REPO, parse_sides
from train_step import interleave, machine, peak_flops

sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import jfacerec  # noqa: E402
from jfacerec.core import workdir as workdir_files  # noqa: E402
from jfacerec.data.pipeline import normalize  # noqa: E402

SIDES = ("jfacerec_float32", "jfacerec_bfloat16", "torch_float32", "torch_bf16_autocast",
         "onnxruntime")
PEAK_SIZE = 2048


def torch_peak(dtype: str, size: int = PEAK_SIZE, repeats: int = 5) -> float:
    """Median FLOP/s of a [size, size] x [size, size] matmul in `dtype`, as nn.Linear computes it
    (F.linear, the second operand transposed: on some CPUs torch.mm in bfloat16 takes a path
    two orders of magnitude slower)."""
    import torch
    import torch.nn.functional as F

    from train_step import seconds

    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    F.linear(a, b)
    times = [seconds(lambda: F.linear(a, b)) for _ in range(repeats)]
    return 2 * size ** 3 / float(np.median(times))


def make_workdirs(name: str, scratch: str) -> tuple[object, dict[str, str]]:
    """(the torch model, {"float32": W, "bfloat16": W, "onnx": FILE}) for backbone `name`."""
    import arcface_torch_models
    import torch

    torch_model = arcface_torch_models.randomize(arcface_torch_models.get_model(name), seed=0)
    pth = os.path.join(scratch, f"{name}.pth")
    torch.save(torch_model.state_dict(), pth)
    paths = {"float32": os.path.join(scratch, f"{name}_float32"),
             "bfloat16": os.path.join(scratch, f"{name}_bfloat16"),
             "onnx": os.path.join(scratch, f"{name}.onnx")}
    for dtype in ("float32", "bfloat16"):
        run_module("jfacerec.convert", "torch", pth, "--model", name, "--workdir", paths[dtype])
        config = workdir_files.read_config(paths[dtype])
        config.dtype, config.eval.flip = dtype, False
        workdir_files.write_config(config, paths[dtype])
    run_module("jfacerec.export", "onnx", "--workdir", paths["float32"], "--out", paths["onnx"])
    return torch_model, paths


def run_module(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def sides_of(name: str, faces: np.ndarray, sides: list[str], scratch: str
             ) -> tuple[dict[str, Callable[[], np.ndarray]], float]:
    """({side: embed the batch}, the backbone's forward FLOPs per image)."""
    torch_model, paths = make_workdirs(name, scratch)
    inputs = normalize(faces).transpose(0, 3, 1, 2).copy()  # NCHW float32 in [-1, 1]
    runs: dict[str, Callable[[], np.ndarray]] = {}
    for dtype in ("float32", "bfloat16"):
        if f"jfacerec_{dtype}" in sides:
            recognizer = jfacerec.load(paths[dtype])
            recognizer.batch_size = len(faces)
            runs[f"jfacerec_{dtype}"] = lambda r=recognizer: r.embed(faces)
    if any(s.startswith("torch_") for s in sides):
        import torch

        model = torch_model.to(memory_format=torch.channels_last)
        x = torch.from_numpy(inputs).contiguous(memory_format=torch.channels_last)

        def torch_embed(autocast: bool) -> np.ndarray:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                return model(x).float().numpy()

        if "torch_float32" in sides:
            runs["torch_float32"] = lambda: torch_embed(False)
        if "torch_bf16_autocast" in sides:
            runs["torch_bf16_autocast"] = lambda: torch_embed(True)
    if "onnxruntime" in sides:
        import onnxruntime

        session = onnxruntime.InferenceSession(paths["onnx"],
                                               providers=["CPUExecutionProvider"])
        runs["onnxruntime"] = lambda: session.run(None, {"data": inputs})[0]
    check_agreement(name, {k: v for k, v in runs.items() if "bf" not in k})
    return runs, forward_flops(paths["float32"], faces)


def check_agreement(name: str, runs: dict[str, Callable[[], np.ndarray]]) -> None:
    """The float32 sides give the same embeddings (cosine > 0.9999 for every face)."""
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731
    embeddings = {k: unit(np.asarray(run(), np.float64)) for k, run in runs.items()}
    first, *others = embeddings
    for other in others:
        cosine = float(np.min(np.sum(embeddings[first] * embeddings[other], axis=1)))
        print(f"{name}: min cosine {first} / {other} = {cosine:.6f}", flush=True)
        assert cosine > 0.9999, (name, first, other, cosine)


def forward_flops(workdir: str, faces: np.ndarray) -> float:
    """FLOPs per image of the eval-mode backbone, from XLA's cost analysis of its forward."""
    restored = jfacerec.load(workdir)._restored
    model, variables = restored.model, restored.variables
    x = jnp.zeros((len(faces), *faces.shape[1:]), jnp.float32)
    lowered = jax.jit(lambda v, x: model.apply(v, x, return_feats=True)).lower(variables, x)
    return float(lowered.cost_analysis()["flops"]) / len(faces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="iresnet50,mobilefacenet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each side")
    parser.add_argument("--sides", default=",".join(SIDES))
    args = parser.parse_args()
    sides = parse_sides(parser, args.sides, SIDES)
    with_torch = any(s.startswith("torch_") for s in sides)

    peaks = {"jax_float32": peak_flops("float32", PEAK_SIZE),
             "jax_bfloat16": peak_flops("bfloat16", PEAK_SIZE)}
    if with_torch:
        peaks.update(torch_float32=torch_peak("float32"), torch_bfloat16=torch_peak("bfloat16"))
    best = {dtype: max(v for k, v in peaks.items() if k.endswith(dtype))
            for dtype in ("float32", "bfloat16")}
    print("matmul peaks GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()),
          flush=True)

    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (args.batch, 112, 112, 3), dtype=np.uint8)
    rates: dict[str, dict[str, float]] = {}
    mfu: dict[str, dict[str, dict[str, float]]] = {}
    flops: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            runs, flops[name] = sides_of(name, faces, sides, scratch)
            times = interleave({k: (lambda r=r: r()) for k, r in runs.items()}, args.repeats, 1)
            rates[name] = {k: args.batch / float(np.median(v)) for k, v in times.items()}
            mfu[name] = {k: {f"vs_{d}_peak": rate * flops[name] / best[d] for d in best}
                         for k, rate in rates[name].items()}
            fastest_peer = max((k for k in rates[name] if not k.startswith("jfacerec")),
                               key=rates[name].get, default=None)
            print(f"\n{name} ({flops[name] / 1e9:.2f} GFLOP/image, batch {args.batch})")
            print("| side | images/s | x fastest peer | MFU vs f32 peak | MFU vs bf16 peak |")
            print("| --- | --- | --- | --- | --- |")
            for k, rate in rates[name].items():
                ratio = rate / rates[name][fastest_peer] if fastest_peer else float("nan")
                print(f"| {k} | {rate:.1f} | {ratio:.2f}x | {mfu[name][k]['vs_float32_peak']:.1%}"
                      f" | {mfu[name][k]['vs_bfloat16_peak']:.1%} |", flush=True)
    print(json.dumps({"machine": machine(with_torch), "batch": args.batch,
                      "peaks_gflops": {k: v / 1e9 for k, v in peaks.items()},
                      "flops_per_image": flops, "images_per_second": rates, "mfu": mfu}))


if __name__ == "__main__":
    main()
