"""Compare normalisations (and DropBlock) of the demo backbone with the same data and budget.

python benchmarks/norms.py --steps 400

Trains and evaluates `configs/demo.py:base` (the base config: the demo without its recipe) with
`model.norm` = batch, group, layer, instance, and with group norm plus DropBlock (rate 0.1 after
the last two stages); prints a markdown table and, as its last line, JSON with every run's
figures and each one's AUC relative to group norm.
"""

from __future__ import annotations

import argparse
import os

from common import REPO, report, train_and_evaluate

KEYS = ("verification/auc", "verification/tar@far=1e-3", "openset/accuracy",
        "classification/top1")
RUNS = {
    "batch": ["--config.model.norm=batch"],
    "group": ["--config.model.norm=group"],
    "layer": ["--config.model.norm=layer"],
    "instance": ["--config.model.norm=instance"],
    "group+dropblock": ["--config.model.norm=group", "--config.model.dropblock=0.1"],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "norms"))
    parser.add_argument("--runs", default=",".join(RUNS))
    args = parser.parse_args()
    results = {}
    for name in args.runs.split(","):
        results[name] = train_and_evaluate("configs/demo.py:base", os.path.join(args.workdir, name),
                                           [f"--config.total_steps={args.steps}", *RUNS[name]])
        print(f"{name}: " + ", ".join(f"{k} {results[name][k]:.4f}" for k in KEYS), flush=True)
    report(results, KEYS, "group", {"steps": args.steps})


if __name__ == "__main__":
    main()
