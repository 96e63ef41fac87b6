"""Shared by the comparison benchmarks: train and evaluate one config in subprocesses, tabulate."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_sides(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...],
                required: tuple[str, ...] = ()) -> list[str]:
    """The sides named in a comma-separated `--sides`, in order; a side not in `known`, or one of
    `required` left out, ends the script through parser.error."""
    sides = text.split(",")
    if unknown := set(sides) - set(known):
        parser.error(f"unknown sides {sorted(unknown)}")
    if missing := set(required) - set(sides):
        parser.error(f"--sides must include {sorted(missing)}")
    return sides


def train_and_evaluate(config: str, workdir: str, overrides: list[str]) -> dict:
    """Runs `jfacerec.train` then `jfacerec.evaluate`; returns eval/metrics.json plus `seconds`.

    config: "configs/NAME.py[:ARG]" relative to the repository.
    """
    args = [f"--config={os.path.join(REPO, config)}", f"--workdir={workdir}", *overrides]
    start = time.perf_counter()
    for module in ("jfacerec.train", "jfacerec.evaluate"):
        subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        result = json.load(f)
    result["seconds"] = time.perf_counter() - start
    return result


def report(results: dict[str, dict], keys: tuple[str, ...], baseline: str, extra: dict) -> None:
    """Prints a markdown table, then the JSON line: every run's figures and AUC / baseline's."""
    print("| run | " + " | ".join(keys) + " | seconds |")
    print("| --- " * (len(keys) + 2) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + f" | {r['seconds']:.0f} |")
    summary = {name: {k: r[k] for k in keys} for name, r in results.items()}
    if baseline in results:
        base = results[baseline]["verification/auc"]
        for name in summary:
            summary[name][f"auc_ratio_to_{baseline}"] = results[name]["verification/auc"] / base
    print(json.dumps({**extra, "results": summary}))
