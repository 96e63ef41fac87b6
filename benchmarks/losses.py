"""Compare training objectives with the same backbone, data and budget on the synthetic open set.

python benchmarks/losses.py --steps 400 --workdir workdirs/losses [--objectives softmax,arcface]

Trains and evaluates `configs/demo_losses.py:NAME` for each objective (softmax, center, triplet,
sphereface, cosface, arcface, joint = 0.7 softmax + 0.3 triplet), then prints a markdown table and,
as its last line, JSON with every objective's figures and each one's AUC relative to softmax.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = "softmax,center,triplet,sphereface,cosface,arcface,joint"
KEYS = ("verification/auc", "verification/tar@far=1e-3", "openset/accuracy",
        "classification/top1")


def run(objective: str, steps: int, workdir: str) -> dict:
    config = [f"--config={os.path.join(REPO, 'configs', 'demo_losses.py')}:{objective}",
              f"--workdir={workdir}", f"--config.total_steps={steps}"]
    start = time.perf_counter()
    for module in ("jfacerec.train", "jfacerec.evaluate"):
        subprocess.run([sys.executable, "-m", module, *config], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        result = json.load(f)
    result["seconds"] = time.perf_counter() - start
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "losses"))
    parser.add_argument("--objectives", default=DEFAULT)
    args = parser.parse_args()
    results = {}
    for objective in args.objectives.split(","):
        results[objective] = run(objective, args.steps, os.path.join(args.workdir, objective))
        print(f"{objective}: " + ", ".join(f"{k} {results[objective][k]:.4f}" for k in KEYS),
              flush=True)
    print("| objective | " + " | ".join(KEYS) + " | seconds |")
    print("| --- " * (len(KEYS) + 2) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in KEYS) + f" | {r['seconds']:.0f} |")
    summary = {name: {k: r[k] for k in KEYS} for name, r in results.items()}
    if "softmax" in results:
        base = results["softmax"]["verification/auc"]
        for name in summary:
            summary[name]["auc_ratio_to_softmax"] = results[name]["verification/auc"] / base
    print(json.dumps({"steps": args.steps, "results": summary}))


if __name__ == "__main__":
    main()
