"""Our train step with the conv and norm arithmetic as it is, against the same step with that of
another git revision, in one process, steps interleaved: what a change to the conv or norm
arithmetic buys, without the run-to-run drift of separate processes.

python benchmarks/layers_ab.py --against REV [--models iresnet18,mobilefacenet] [--steps 8]
    [--batch resnet_tiny=128,iresnet18=16,mobilefacenet=16] [--torch]

Both steps are built as benchmarks/train_step.py builds "ours" (training.make_train_step, state
donated, xla_cpu.compiler_options()). For the other revision, the modules that hold the arithmetic
(`models/xla_cpu.py` and `models/norms.py`, or `models/layers.py` before they were split from it)
are loaded as modules of their own, and their `conv_general_dilated` and `_normalize` stand in
for the current ones while the step is traced; everything else (models, training, losses) is the current code. `--torch` adds
PyTorch's channels_last step as a third, for the ratio. Medians over the steps after one warm-up
round.

Last line: JSON with images/s per model and side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import ModuleType

import numpy as np

import train_step  # benchmarks/ is on the path when run as a script; it puts the repo there too
from jfacerec.models import layers, norms

# Where the backbones look each function up when a step is traced, and the file that defines it
# (before the split of layers.py, layers.py defined both).
SWAPPED = {"conv_general_dilated": (layers, "xla_cpu.py"), "_normalize": (norms, "norms.py")}


def module_at(revision: str, filename: str) -> ModuleType | None:
    """jfacerec/models/<filename> of `revision`, imported as a module of its own; None when the
    revision has no such file."""
    path = f"{revision}:jfacerec/models/{filename}"
    shown = subprocess.run(["git", "show", path], cwd=train_step.REPO, capture_output=True,
                           text=True)
    if shown.returncode:
        return None
    module = ModuleType(f"{filename[:-3]}_at_{revision}")
    sys.modules[module.__name__] = module  # flax's dataclass transform looks the module up
    exec(compile(shown.stdout, path, "exec"), module.__dict__)
    return module


def arithmetic_at(revision: str) -> dict:
    """{name: function} of SWAPPED's functions as `revision` defines them."""
    old_layers = None
    out = {}
    for name, (_, filename) in SWAPPED.items():
        module = module_at(revision, filename)
        if module is None:
            old_layers = old_layers or module_at(revision, "layers.py")
            module = old_layers
        out[name] = getattr(module, name)
    return out


def compare(name: str, batch: int, steps: int, other: dict, with_torch: bool) -> dict:
    config = train_step.get_config(name, batch, "float32")
    classes = config.dataset.num_identities
    runs = {"current": train_step.jax_step(config, classes, "ours")[0]}
    originals = {k: getattr(where, k) for k, (where, _) in SWAPPED.items()}
    try:
        for k, (where, _) in SWAPPED.items():
            setattr(where, k, other[k])
        runs["against"] = train_step.jax_step(config, classes, "ours")[0]
    finally:
        for k, (where, _) in SWAPPED.items():
            setattr(where, k, originals[k])
    if with_torch:
        import torch_peers

        runs["torch"] = torch_peers.torch_step(config, classes, True, False)[0]
    times = train_step.interleave(runs, steps, warmup=1)
    rates = {k: batch / float(np.median(v)) for k, v in times.items()}
    print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
          + f" img/s; current / against {rates['current'] / rates['against']:.3f}", flush=True)
    return {"batch": batch, **{f"{k}_images_per_s": v for k, v in rates.items()},
            "current_over_against": rates["current"] / rates["against"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="git revision of the other arithmetic")
    parser.add_argument("--models", default=",".join(train_step.MODELS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", default="", help="one number, or model=batch,...")
    parser.add_argument("--torch", action="store_true", help="also time PyTorch channels_last")
    args = parser.parse_args()
    batches = train_step.parse_batches(args.batch, train_step.CPU_BATCH)
    other = arithmetic_at(args.against)
    load = os.getloadavg()[0]
    start = time.time()
    results = {name: compare(name, batches[name], args.steps, other, args.torch)
               for name in args.models.split(",")}
    print(json.dumps({"against": args.against, "steps": args.steps, "load_average": [
        load, os.getloadavg()[0]], "seconds": time.time() - start,
        "machine": train_step.machine(args.torch), "results": results}))


if __name__ == "__main__":
    main()
