"""Time to accuracy: jfacerec against a plain PyTorch loop, the same recipe for the same minutes.

python benchmarks/time_to_accuracy.py --config configs/lfw.py --minutes 5,10,20 --out-dir DIR
    [--sides jfacerec,torch] [--set KEY=VALUE ...]

Both sides train the config's recipe (LFW View 1: configs/lfw.py) from scratch on the same
machine, one after the other (jfacerec first), each alone: the same architecture
(benchmarks/torch_peers.py), the same batches (one jfacerec input pipeline each, same seed: the
same decoded faces, augmentation and order; torch gets them NHWC -> NCHW), the same loss, SGD and
learning-rate schedule. The largest of --minutes is the budget; the others are snapshots of the
same run. Every face of the training set is decoded before either clock starts.

Each side's step count is its steady-state step rate, measured first on a throwaway run, times
the budget; both then follow the config's schedule (warmup, cosine) over their own count.
jfacerec is `jfacerec.training.train`, timed from the call to its return: compilation and
checkpoint writes are its real cost and are inside its clock (so it may overrun the budget by
them); a snapshot's time is read at the step, before that step's checkpoint is written. torch
keeps its snapshots as in-memory copies. Snapshots are scored afterwards, untimed, as
jfacerec.evaluation.lfw does: the cosine of flip-averaged unit embeddings of the pairs file's
pairs, accuracy by 10-fold cross-validation, AUC, TAR@FAR=1e-3.

Last line: JSON with `accuracy` {minutes: {side: value}}, `images_per_second`, `steps`, each
snapshot's elapsed seconds, AUC and TAR@FAR=1e-3, the machine and its load average before and
after. Also written to DIR/time_to_accuracy.json, with a plot DIR/time_to_accuracy.png.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import dataclasses
import json
import math
import os
import sys
import time
from fractions import Fraction
from typing import Callable, Iterator

import numpy as np

from common import REPO, parse_sides
from train_step import machine

sys.path.insert(0, REPO)

import jfacerec.data.sources  # noqa: E402
from jfacerec import metrics  # noqa: E402
from jfacerec.core import config_base  # noqa: E402
from jfacerec.core import workdir as workdir_files  # noqa: E402
from jfacerec.data import pipeline  # noqa: E402
from jfacerec.data.folders import ImageFiles  # noqa: E402
from jfacerec.data.pairs import read_lfw_pairs  # noqa: E402
from jfacerec.data.records import FaceDataset, ImageFileSource, Source  # noqa: E402
from jfacerec.evaluation.lfw import fold_accuracies  # noqa: E402
from jfacerec.inference.recognizer import load  # noqa: E402
from jfacerec.training import learning_rate_schedule, train  # noqa: E402

SIDES = ("jfacerec", "torch")
# Calibration: steps run before the rate is measured (compilation, the first batches), then the
# steps timed; jfacerec logs every WARMUP_STEPS, so the timed steps are a whole number of logs.
WARMUP_STEPS, TIMED_STEPS = 5, 20
CLOCK_KEY = "val/elapsed_seconds"


# ---- the plan: budget, snapshots, steps ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """The budget split into `parts` equal intervals; snapshot k is at parts_at[k] of them."""

    minutes: tuple[float, ...]  # ascending; the last is the budget
    parts: int
    parts_at: tuple[int, ...]

    @property
    def budget_s(self) -> float:
        return 60.0 * self.minutes[-1]

    def total_steps(self, steps_per_second: float) -> int:
        """The steps that fit the budget at that rate, rounded down to a whole number of parts
        (so that every snapshot falls on a step)."""
        steps = math.floor(steps_per_second * self.budget_s / self.parts) * self.parts
        if steps == 0:
            raise ValueError(f"{steps_per_second:.2f} steps/s cannot give the {self.parts} "
                             f"snapshot intervals a step each in {self.budget_s:g} s; raise "
                             f"--minutes or make the steps cheaper (--set image_size=...)")
        return steps

    def snapshot_steps(self, total_steps: int) -> list[int]:
        return [total_steps // self.parts * k for k in self.parts_at]


def plan(minutes: list[float]) -> Plan:
    """The snapshots' common interval: the budget over the greatest common divisor of the
    minutes (5, 10, 20 -> 4 parts; snapshots at 1, 2 and 4)."""
    exact = [Fraction(str(m)) for m in sorted(minutes)]
    scale = math.lcm(*(f.denominator for f in exact))
    whole = [int(f * scale) for f in exact]
    unit = math.gcd(*whole)
    return Plan(tuple(sorted(minutes)), whole[-1] // unit, tuple(w // unit for w in whole))


# ---- the config and the data ---------------------------------------------------------------------

def configured(spec: str, overrides: list[str]):
    """The config of "PATH[:ARG]" with each "KEY=VALUE" set (dotted keys; VALUE a Python
    literal, else text)."""
    config = config_base.load(spec)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. --set image_size=32")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise ValueError(f"--set {item!r}: the config has no key {key!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node[leaf] = value
    if config.accumulate_steps != 1:
        raise ValueError("the torch loop takes an update per batch; set accumulate_steps=1")
    return config


def decoded_dataset(config) -> FaceDataset:
    """The config's dataset with every training face decoded (and cached: dataset.cache must be
    on), so that neither side's clock includes decoding."""
    if not config.dataset.cache:
        raise ValueError("decoding before the clocks start needs the faces kept: set "
                         "dataset.cache=True")
    dataset = jfacerec.data.sources.get_dataset(config)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        # Pillow decodes outside the GIL: the cores decode in parallel.
        for _ in pool.map(dataset.train.__getitem__, range(len(dataset.train))):
            pass
    return dataset


def train_batches(config, source: Source) -> Iterator[dict[str, np.ndarray]]:
    """The training stream jfacerec.training.train builds for the config (one process): image
    float32 [batch, size, size, 3] in [-1, 1], label int32 [batch]."""
    return iter(pipeline.train_dataset(
        source, batch_size=config.batch_size, image_size=config.image_size, seed=config.seed,
        augment=pipeline.Augment(**config.input.augment), num_workers=config.input.num_workers,
        num_threads=config.input.num_threads, worker_threads=config.input.worker_threads,
        sampler=config.input.sampler, pk_images=config.input.pk_images))


# ---- jfacerec ------------------------------------------------------------------------------------

class Clock:
    """A training.Validator that measures only time: the seconds since `start`, logged to
    metrics.jsonl at each call. Always "better", so each call also keeps that step's
    checkpoint (rotation never deletes the best one)."""

    best_key = CLOCK_KEY
    higher_is_better = True

    def __init__(self, start: float):
        self.start = start

    def __call__(self, variables, step: int) -> dict[str, float]:
        del variables, step
        return {CLOCK_KEY: time.perf_counter() - self.start}


def jfacerec_rate(config, dataset: FaceDataset, workdir: str) -> float:
    """Steady-state steps/s of train() on a throwaway run: the mean over the logged intervals
    after the first (which holds compilation)."""
    c = copy.deepcopy(config)
    c.total_steps, c.log_every_steps = WARMUP_STEPS + TIMED_STEPS, WARMUP_STEPS
    c.checkpoint_every_steps, c.eval.every_steps = c.total_steps, 0
    train(c, workdir, dataset=dataset)
    records = [r for r in workdir_files.read_metrics(workdir) if "images_per_second" in r]
    seconds = sum(WARMUP_STEPS * c.batch_size / r["images_per_second"] for r in records[1:])
    return TIMED_STEPS / seconds


def run_jfacerec(config, dataset: FaceDataset, schedule: Plan, out_dir: str) -> dict:
    """Calibrates, then trains for the budget; the snapshots' steps and elapsed seconds."""
    rate = jfacerec_rate(config, dataset, os.path.join(out_dir, "jfacerec_calibration"))
    c = copy.deepcopy(config)
    c.total_steps = schedule.total_steps(rate)
    interval = c.total_steps // schedule.parts
    c.checkpoint_every_steps = c.eval.every_steps = interval
    c.keep_checkpoints = schedule.parts
    workdir = os.path.join(out_dir, "jfacerec")
    start = time.perf_counter()
    train(c, workdir, validate=Clock(start), dataset=dataset)
    seconds = time.perf_counter() - start
    clock = {r["step"]: r[CLOCK_KEY] for r in workdir_files.read_metrics(workdir)
             if CLOCK_KEY in r}
    steps = schedule.snapshot_steps(c.total_steps)
    return {"workdir": workdir, "steps": c.total_steps, "calibration_steps_per_second": rate,
            "seconds": seconds, "snapshot_steps": steps,
            "elapsed_seconds": [clock[s] for s in steps]}


def jfacerec_embedder(workdir: str, step: int,
                      batch_size: int) -> Callable[[list[str]], np.ndarray]:
    """paths -> unit embeddings [n, dim] of checkpoint `step`, as jfacerec.load gives them."""
    recognizer = load(workdir, step=step, batch_size=batch_size)
    return lambda paths: recognizer.embed_files(paths, desc=f"step {step}")


# ---- torch ---------------------------------------------------------------------------------------

def torch_batch(batch: dict[str, np.ndarray]):
    """A pipeline batch -> (images [batch, 3, size, size], labels int64 [batch]); the NHWC
    buffer seen as NCHW is torch's channels_last layout, its faster one on CPU."""
    import torch

    return (torch.from_numpy(batch["image"]).permute(0, 3, 1, 2),
            torch.from_numpy(batch["label"]).long())


def torch_trainer(config, classes: int):
    """(model, optimizer, loss function): the peers of the config's, seeded from config.seed."""
    import torch
    import torch_peers

    torch.manual_seed(config.seed)
    model = torch_peers.torch_model(config, classes).to(memory_format=torch.channels_last)
    return model.train(), torch_peers.torch_optimizer(model, config), torch_peers.torch_loss(config)


def torch_rate(config, source: Source, classes: int) -> float:
    """Steady-state steps/s of the torch loop on a throwaway model, after WARMUP_STEPS."""
    model, opt, loss_fn = torch_trainer(config, classes)
    batches = train_batches(config, source)
    start = 0.0
    for step in range(WARMUP_STEPS + TIMED_STEPS):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        images, labels = torch_batch(next(batches))
        opt.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        opt.step()
    return TIMED_STEPS / (time.perf_counter() - start)


def run_torch(config, dataset: FaceDataset, schedule: Plan) -> dict:
    """Calibrates, then trains for the budget; snapshots (state_dict copies, with the moving
    average's parameters when config.ema.decay is set) with their steps and elapsed seconds."""
    import torch

    torch.set_num_threads(os.cpu_count())
    classes = dataset.num_classes
    rate = torch_rate(config, dataset.train, classes)
    c = copy.deepcopy(config)
    c.total_steps = schedule.total_steps(rate)
    lrs = np.asarray(learning_rate_schedule(c)(np.arange(c.total_steps)), np.float64)
    steps = schedule.snapshot_steps(c.total_steps)
    model, opt, loss_fn = torch_trainer(c, classes)
    decay = c.ema.decay
    # jfacerec's average: of the parameters only (BatchNorm statistics are the live ones).
    ema = {k: p.detach().clone() for k, p in model.named_parameters()} if decay > 0 else None
    batches = train_batches(c, dataset.train)
    snapshots, elapsed = [], []
    start = time.perf_counter()
    for step in range(c.total_steps):
        images, labels = torch_batch(next(batches))
        for group in opt.param_groups:
            group["lr"] = float(lrs[step])
        opt.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        opt.step()
        if ema is not None:
            d = min(decay, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                for k, p in model.named_parameters():
                    ema[k].mul_(d).add_(p, alpha=1.0 - d)
        if step + 1 in steps:
            elapsed.append(time.perf_counter() - start)
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()}
                             | ({k: v.clone() for k, v in ema.items()} if ema else {}))
    seconds = time.perf_counter() - start
    return {"model": model, "snapshots": snapshots, "steps": c.total_steps,
            "calibration_steps_per_second": rate, "seconds": seconds, "snapshot_steps": steps,
            "elapsed_seconds": elapsed}


def torch_embedder(model, state: dict, config) -> Callable[[list[str]], np.ndarray]:
    """paths -> unit embeddings [n, dim] of the snapshot `state`, preprocessed as jfacerec.load
    does (the central crop_fraction, resized to image_size, [-1, 1]; plus the left-right flip's
    embedding when config.eval.flip)."""
    import torch
    import torch.nn.functional as F

    model.load_state_dict(state)
    model.eval()

    def embed(paths: list[str]) -> np.ndarray:
        files = ImageFiles("", (), tuple(paths), np.zeros(len(paths), np.int32))
        source = ImageFileSource(files, size=config.image_size,
                                 crop_fraction=config.dataset.crop_fraction)
        out = []
        with torch.no_grad():
            for batch in pipeline.eval_batches(source, batch_size=config.eval.batch_size,
                                               image_size=config.image_size):
                images, _ = torch_batch(batch)
                e = model.embed(images)
                if config.eval.flip:
                    e = e + model.embed(images.flip(3))
                out.append(F.normalize(e, dim=1).numpy())
        return np.concatenate(out)

    return embed


# ---- scoring and the report ----------------------------------------------------------------------

def verification(embed: Callable[[list[str]], np.ndarray], config) -> dict[str, float]:
    """The LFW protocol's figures of an embedder on the config's pairs file (its first fold, View
    1's only one): accuracy (10-fold cross-validated threshold), AUC, TAR@FAR=1e-3."""
    pairs = read_lfw_pairs(config.dataset.pairs)[0]
    paths = [p for pair in pairs for p in pair.paths(config.dataset.root)]
    unique = sorted(set(paths))
    position = {p: i for i, p in enumerate(unique)}
    embeddings = embed(unique)
    first = embeddings[[position[p] for p in paths[0::2]]]
    second = embeddings[[position[p] for p in paths[1::2]]]
    scores = np.sum(first * second, axis=-1)
    same = np.array([p.same for p in pairs])
    accuracies, _, _ = fold_accuracies([scores], [same])
    return {"accuracy": accuracies[0], "auc": metrics.roc_auc(scores, same),
            "tar@far=1e-3": metrics.tar_at_far(scores, same, 1e-3)}


def summary(schedule: Plan, runs: dict[str, dict], figures: dict[str, list[dict]],
            batch_size: int) -> dict:
    """The JSON record: per snapshot (minutes as text) and side, its figures and timing."""
    keys = [f"{m:g}" for m in schedule.minutes]

    def per_snapshot(value: Callable[[str, int], float]) -> dict:
        return {key: {side: value(side, i) for side in runs} for i, key in enumerate(keys)}

    return {
        "accuracy": per_snapshot(lambda s, i: figures[s][i]["accuracy"]),
        "auc": per_snapshot(lambda s, i: figures[s][i]["auc"]),
        "tar@far=1e-3": per_snapshot(lambda s, i: figures[s][i]["tar@far=1e-3"]),
        "elapsed_seconds": per_snapshot(lambda s, i: runs[s]["elapsed_seconds"][i]),
        "snapshot_steps": per_snapshot(lambda s, i: runs[s]["snapshot_steps"][i]),
        "steps": {s: r["steps"] for s, r in runs.items()},
        # Over the whole timed run (jfacerec's compilation and checkpoints included).
        "images_per_second": {s: r["steps"] * batch_size / r["seconds"] for s, r in runs.items()},
        "train_seconds": {s: r["seconds"] for s, r in runs.items()},
        "calibration_images_per_second": {s: r["calibration_steps_per_second"] * batch_size
                                          for s, r in runs.items()},
        "budget_seconds": schedule.budget_s,
    }


def table(result: dict) -> str:
    """minutes | each side's accuracy (and elapsed seconds) | jfacerec / torch."""
    sides = list(result["steps"])
    lines = ["| minutes | " + " | ".join(f"{s} accuracy (s)" for s in sides)
             + (" | ratio jfacerec / torch |" if len(sides) == 2 else " |"),
             "| --- " * (1 + len(sides) + (len(sides) == 2)) + "|"]
    for key, row in result["accuracy"].items():
        cells = [f"{row[s]:.4f} ({result['elapsed_seconds'][key][s]:.0f})" for s in sides]
        ratio = ([f"{row['jfacerec'] / row['torch']:.3f}" if row["torch"] else "-"]
                 if len(sides) == 2 else [])
        lines.append(f"| {key} | " + " | ".join(cells + ratio) + " |")
    return "\n".join(lines)


def plot(path: str, result: dict) -> None:
    """Accuracy against the snapshot's real elapsed minutes, one line per side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, as jfacerec.evaluation.plots
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for side in result["steps"]:
        minutes = [t[side] / 60 for t in result["elapsed_seconds"].values()]
        ax.plot(minutes, [a[side] for a in result["accuracy"].values()], "o-", label=side)
    ax.set(xlabel="training minutes (elapsed)", ylabel="LFW pair accuracy",
           title="Time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    parser.add_argument("--minutes", default="5,10,20",
                        help="snapshot times; the largest is the training budget")
    parser.add_argument("--out-dir", required=True, help="an empty or new folder")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (repeatable), e.g. --set image_size=32")
    args = parser.parse_args()
    sides = parse_sides(parser, args.sides, SIDES)
    try:
        minutes = [float(m) for m in args.minutes.split(",")]
    except ValueError:
        parser.error(f"--minutes {args.minutes!r}: give numbers separated by commas (5,10,20)")
    if min(minutes) <= 0 or len(set(minutes)) != len(minutes):
        parser.error(f"--minutes {args.minutes!r}: give distinct positive numbers")
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        parser.error(f"--out-dir {args.out_dir} is not empty: training there would resume an "
                     f"old run; give a new folder")
    os.makedirs(args.out_dir, exist_ok=True)
    config = configured(args.config, args.set)
    schedule = plan(minutes)
    load_before = os.getloadavg()

    dataset = decoded_dataset(config)
    print(f"{len(dataset.train)} training faces decoded, {dataset.num_classes} identities",
          flush=True)
    runs = {}
    if "jfacerec" in sides:
        runs["jfacerec"] = run_jfacerec(config, dataset, schedule, args.out_dir)
    if "torch" in sides:
        runs["torch"] = run_torch(config, dataset, schedule)
    load_after = os.getloadavg()
    for side, r in runs.items():
        print(f"{side}: {r['steps']} steps in {r['seconds']:.1f} s", flush=True)

    figures = {}
    if "jfacerec" in runs:
        r = runs["jfacerec"]
        figures["jfacerec"] = [verification(jfacerec_embedder(r["workdir"], step,
                                                              config.eval.batch_size), config)
                               for step in r["snapshot_steps"]]
    if "torch" in runs:
        r = runs["torch"]
        figures["torch"] = [verification(torch_embedder(r["model"], state, config), config)
                            for state in r["snapshots"]]

    result = {"config": args.config, "overrides": args.set, "minutes": schedule.minutes,
              **summary(schedule, runs, figures, config.batch_size),
              "machine": machine("torch" in sides),
              "load": {"before": list(load_before), "after": list(load_after)}}
    print(table(result))
    with open(os.path.join(args.out_dir, "time_to_accuracy.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(os.path.join(args.out_dir, "time_to_accuracy.png"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
