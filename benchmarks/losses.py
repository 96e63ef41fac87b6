"""Compare training objectives with the same backbone, data and budget on the synthetic open set.

python benchmarks/losses.py --steps 400 [--objectives softmax,arcface]

Trains and evaluates `configs/demo_losses.py:NAME` for each objective (softmax, center, triplet,
sphereface, cosface, arcface, joint = 0.7 softmax + 0.3 triplet), then prints a markdown table and,
as its last line, JSON with every objective's figures and each one's AUC relative to softmax.
"""

from __future__ import annotations

import argparse
import os

from common import REPO, report, train_and_evaluate

KEYS = ("verification/auc", "verification/tar@far=1e-3", "openset/accuracy",
        "classification/top1")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "losses"))
    parser.add_argument("--objectives",
                        default="softmax,center,triplet,sphereface,cosface,arcface,joint")
    parser.add_argument("--set", action="append", default=[],
                        help="a config override for every run, e.g. loss.arcface.margin=0.3")
    args = parser.parse_args()
    results = {}
    for name in args.objectives.split(","):
        results[name] = train_and_evaluate(f"configs/demo_losses.py:{name}",
                                           os.path.join(args.workdir, name),
                                           [f"--config.total_steps={args.steps}",
                                            *(f"--config.{kv}" for kv in args.set)])
        print(f"{name}: " + ", ".join(f"{k} {results[name][k]:.4f}" for k in KEYS), flush=True)
    report(results, KEYS, "softmax", {"steps": args.steps, "overrides": args.set})


if __name__ == "__main__":
    main()
