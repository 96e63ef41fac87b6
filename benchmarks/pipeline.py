"""Input pipeline on real JPEGs: jfacerec's grain pipeline against a PyTorch DataLoader doing the
same work with the same PIL operations, and both against the rate at which the train step
consumes images.

python benchmarks/pipeline.py [--config configs/lfw.py] [--images 1536] [--rounds 2] [--steps 5]
    [--sides grain,torch]

`--sides grain` runs the grain cases and the train step without importing torch (the test suite
runs it that way, at its smallest sizes).

The data is what `python -m jfacerec.train --config configs/lfw.py` trains on: LFW deep-funneled
($JFACEREC_DATA/lfw), every person outside the View 1 test pairs. A seeded random subset of those
files (the same files for every case; page cache warmed first) is read once, in one epoch, in
batches of the config's `batch_size` (128). Each case times `--images` images (whole batches) after
two warm-up batches (workers started, first batches out) and before four more batches that are
read but not timed (so that prefetching runs on to the end of the timed window, as it does
before its start).

Per image, both sides do what training with configs/lfw.py does: open the JPEG, decode it at the
reduced scale Pillow's draft mode allows (1/2 here: 125x125), crop the central `crop_fraction`
(0.5), resize to `image_size` (48, bilinear); then a random crop (side 0.8..1 of the face, aspect
1 +- 0.1) resized back to 48, a left-right flip with probability 1/2, brightness, contrast and
saturation changes of up to 20% each, and float32 HWC in [-1, 1]; then batching.

- grain: `jfacerec.data.pipeline.train_dataset` over the `ImageFileSource` that
  `jfacerec.data.sources` builds for the config, `num_workers` 0, 1, 2 (grain's `mp_prefetch`
  processes). With 0 workers, `num_threads` from the config (0 since configs/demo.py changed to
  it; the figures in benchmarks/README.md are from when it was 2), and also 0 (records read in
  the calling thread) where the config's is not 0.
- torch: a `torch.utils.data.Dataset` doing the same with PIL the way torchvision's transforms do
  on PIL images (`Image.crop`/`resize`/`transpose`, `ImageEnhance` for colour; torchvision itself
  is not installed), `DataLoader(batch_size, shuffle=True, drop_last=True, num_workers=0, 1, 2)`.
- "decode": a first epoch, every image decoded. "cached": later epochs, where the config's
  `cache=True` source hands out decoded 48-pixel faces and only augmentation and batching remain
  (both sides read the faces from an in-memory array).
- The train step: `jfacerec.training`'s jitted step for the config (resnet_tiny, BatchNorm,
  softmax, SGD), alone on one fixed batch, and fed by the grain pipeline as the training loop
  feeds it (`next`, `to_global`, step; dispatch is asynchronous, so the pipeline works while the
  step computes), for each grain case, in rounds alternating with runs alone.

Each pipeline case runs in its own subprocess (JAX never shares a process with a forked DataLoader),
one after another (grain and torch alternating, the order reversed every other round), for
`--rounds` rounds; figures are medians over rounds. CPU ms per image: user +
system CPU time of the case's process tree over the timed window, per image. The machine may be
shared: each case records the 1-minute load average as it starts.

Last line: JSON with images/s of every case, the ratios grain / torch and pipeline / train step.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import REPO, parse_sides

sys.path.insert(0, REPO)
WARMUP_BATCHES = 2  # not timed: workers start, first batches out
TAIL_BATCHES = 4  # read after the timed ones, so that prefetching runs to the window's end


def load_config(spec: str):
    """The config of "configs/NAME.py[:ARG]", as `--config` gives it."""
    from jfacerec.core import config_base

    return config_base.load(spec)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its live descendants."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def time_batches(it, n_batches: int, batch: int) -> tuple[object, dict]:
    """Times n_batches after WARMUP_BATCHES: (the first batch, images/s and CPU ms per image)."""
    first = next(it)
    for _ in range(WARMUP_BATCHES - 1):
        next(it)
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(n_batches):
        next(it)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    n = n_batches * batch
    return first, {"images_per_s": n / wall, "cpu_ms_per_image": 1e3 * cpu / n, "images": n}


# -- The torch side: plain PIL, written the way torchvision's PIL transforms do it ----------------

def pil_load(path: str, size: int, fraction: float, draft: bool = True):
    """Open, decode (at the draft scale jfacerec.data.images.decode picks), centre-crop, resize:
    a PIL image [size, size]."""
    from PIL import Image

    image = Image.open(path)
    if draft and image.format == "JPEG":
        min_side = int(np.ceil(size / fraction))
        scale = max(1, min(image.size) // min_side)
        image.draft("RGB", (image.size[0] // scale, image.size[1] // scale))
    image = image.convert("RGB")
    w, h = image.size  # rounded as jfacerec.data.images.center_crop
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR)


def pil_augment(image, rng: np.random.Generator, size: int, aug: dict):
    """RandomResizedCrop (jfacerec's parameters: side scale, aspect change), RandomHorizontalFlip
    and ColorJitter as torchvision does them on PIL images; the random draws as jfacerec's."""
    from PIL import Image, ImageEnhance

    w, h = image.size
    scale = rng.uniform(aug["min_scale"], 1.0)
    aspect = rng.uniform(1.0 - aug["max_aspect_change"], 1.0 + aug["max_aspect_change"])
    ch = min(h, max(1, int(round(h * scale * np.sqrt(aspect)))))
    cw = min(w, max(1, int(round(w * scale / np.sqrt(aspect)))))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    image = image.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR)
    if aug["flip"] and rng.uniform() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance, amount in ((ImageEnhance.Brightness, aug["brightness"]),
                            (ImageEnhance.Contrast, aug["contrast"]),
                            (ImageEnhance.Color, aug["saturation"])):
        if amount:
            image = enhance(image).enhance(rng.uniform(1.0 - amount, 1.0 + amount))
    return image


def torch_case(files: dict, a: argparse.Namespace) -> dict:
    import torch
    from PIL import Image

    size, fraction, aug, batch = a.size, a.crop_fraction, a.augment, a.batch

    class Faces(torch.utils.data.Dataset):
        def __init__(self, paths, labels, faces=None):
            self.paths, self.labels, self.faces = paths, labels, faces

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            image = (Image.fromarray(self.faces[i]) if self.faces is not None
                     else pil_load(self.paths[i], size, fraction, a.draft))
            image = pil_augment(image, np.random.default_rng((a.seed, i)), size, aug)
            # to a float tensor in [-1, 1], HWC like jfacerec's batches (no CHW transpose)
            x = torch.from_numpy(np.asarray(image)).float().mul_(2.0 / 255.0).sub_(1.0)
            return x, int(self.labels[i])

    paths, labels = files["paths"], files["labels"]
    faces = (np.stack([np.asarray(pil_load(p, size, fraction, a.draft)) for p in paths])
             if a.mode == "cached" else None)
    loader = torch.utils.data.DataLoader(
        Faces(paths, labels, faces), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=a.workers, generator=torch.Generator().manual_seed(a.seed))
    (images, _), result = time_batches(iter(loader), len(paths) // batch - WARMUP_BATCHES
                                       - TAIL_BATCHES, batch)
    assert images.shape == (batch, size, size, 3) and images.dtype == torch.float32
    return result


# -- The grain side: jfacerec's own pipeline -----------------------------------------------------

class InMemoryFaces:
    """Decoded faces as records, as `_DecodedSource` hands them out once cached."""

    def __init__(self, faces: np.ndarray, labels: np.ndarray):
        self.faces, self._labels = faces, labels

    def __len__(self) -> int:
        return len(self.faces)

    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int) -> dict:
        return {"image": self.faces[int(index)], "label": self._labels[int(index)]}


def image_files(files: dict):
    from jfacerec.data.folders import ImageFiles

    return ImageFiles(files["root"], tuple(files["names"]), tuple(files["paths"]),
                      np.asarray(files["labels"], np.int32))


def grain_case(files: dict, a: argparse.Namespace) -> dict:
    from jfacerec.data import pipeline
    from jfacerec.data.images import load_face
    from jfacerec.data.records import ImageFileSource

    source = ImageFileSource(image_files(files), size=a.size, crop_fraction=a.crop_fraction,
                             cache=True)
    if a.mode == "cached":
        source = InMemoryFaces(
            np.stack([load_face(p, crop_fraction=a.crop_fraction, size=a.size)
                      for p in files["paths"]]), source.labels())
    ds = pipeline.train_dataset(source, batch_size=a.batch, image_size=a.size, seed=a.seed,
                                augment=pipeline.Augment(**a.augment), num_workers=a.workers,
                                num_threads=a.threads)
    it = iter(ds)
    try:
        first, result = time_batches(
            it, len(source) // a.batch - WARMUP_BATCHES - TAIL_BATCHES, a.batch)
    finally:
        it.close() if hasattr(it, "close") else None
    assert first["image"].shape == (a.batch, a.size, a.size, 3)
    assert first["image"].dtype == np.float32
    return result


def child(a: argparse.Namespace) -> None:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags (jfacerec.train parses them)
    with open(a.files) as f:
        files = json.load(f)
    a.augment = json.loads(a.augment)
    result = (torch_case if a.side == "torch" else grain_case)(files, a)
    print(json.dumps(result))


# -- The parent: data, cases in subprocesses, the train step -------------------------------------

def run_case(common: list[str], side: str, mode: str, workers: int, threads: int,
             draft: bool = True) -> dict:
    load = os.getloadavg()[0]  # other work on the machine, as this case starts
    args = [sys.executable, os.path.abspath(__file__), *common, f"--side={side}", f"--mode={mode}",
            f"--workers={workers}", f"--threads={threads}", f"--draft={int(draft)}"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"case {side}/{mode}/w{workers} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load_1min": load}


def train_step_rates(config, dataset, faces: InMemoryFaces, steps: int, rounds: int,
                     fed: list[tuple[str, str, dict]]) -> dict:
    """The train step built as jfacerec.training.train builds it: alone on one fixed batch, and fed
    by the pipeline for each (name, mode, train_dataset keyword arguments) of `fed`, in interleaved
    rounds (alone, fed, fed, alone, ...). Mode "decode" reads the config's training source afresh
    (a first epoch: every image decoded), "cached" reads `faces` (later epochs). Returns images/s
    of every run, and each fed run's ratio to the mean of the alone runs either side of it."""
    import jax

    from jfacerec import training
    from jfacerec.core import parallel
    from jfacerec.data import pipeline

    mesh = parallel.mesh_from_config(config)
    batch_sharding = parallel.data_sharding(mesh)
    model, tx, abstract = training.abstract_train_state(config, dataset.num_classes, mesh)
    state_sharding = jax.tree.map(lambda s: s.sharding, abstract)
    step = jax.jit(training.make_train_step(model, tx, config, mesh),
                   in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)
    init = jax.jit(lambda rng: training.state_from_config(model, tx, config, rng),
                   out_shardings=state_sharding)
    state = init(jax.random.key(config.seed))

    def make_iter(mode: str, seed: int, **kwargs):
        # pickling drops a source's cache: a fresh copy decodes every image it reads
        source = pickle.loads(pickle.dumps(dataset.train)) if mode == "decode" else faces
        return iter(pipeline.train_dataset(
            source, batch_size=config.batch_size, image_size=config.image_size, seed=seed,
            augment=pipeline.Augment(**config.input.augment), **kwargs))

    it = make_iter("cached", config.seed, num_threads=0)
    fixed = pipeline.to_global(next(it), batch_sharding)
    del it
    start = time.perf_counter()
    state, metrics = step(state, fixed)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start

    def timed(get_batch) -> float:
        nonlocal state
        for _ in range(WARMUP_BATCHES):
            state, metrics = step(state, get_batch())
        jax.block_until_ready(metrics)
        t = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, get_batch())
        jax.block_until_ready(metrics)
        return steps * config.batch_size / (time.perf_counter() - t)

    alone = [timed(lambda: fixed)]
    runs = {name: [] for name, _, _ in fed}
    ratios = {name: [] for name, _, _ in fed}
    for r in range(rounds):
        pending = []
        for i, (name, mode, kwargs) in enumerate(fed if r % 2 == 0 else fed[::-1]):
            # another seed each round: another shuffle, other images
            it = make_iter(mode, config.seed + 1 + r, **kwargs)
            try:
                runs[name].append(timed(lambda: pipeline.to_global(next(it), batch_sharding)))
            finally:
                it.close() if hasattr(it, "close") else None
            pending.append(name)
            if len(pending) == 2 or i == len(fed) - 1:
                alone.append(timed(lambda: fixed))
                for n in pending:
                    ratios[n].append(runs[n][-1] / (0.5 * (alone[-2] + alone[-1])))
                    print(f"round {r + 1}/{rounds} train step fed by grain, {n}: "
                          f"{runs[n][-1]:.0f} images/s ({ratios[n][-1]:.2f} of alone)", flush=True)
                pending = []
    return {"compile_s": compile_s, "alone": alone, "fed": runs, "ratio_fed_to_alone": ratios}


def versions(with_torch: bool) -> dict:
    from importlib import metadata

    import jax
    import PIL

    found = {"python": platform.python_version(), "jax": jax.__version__,
             "grain": metadata.version("grain"), "pillow": PIL.__version__,
             "numpy": np.__version__}
    if with_torch:
        import torch

        found["torch"] = torch.__version__
    return found


MODES = ("decode", "cached")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "lfw.py"))
    parser.add_argument("--images", type=int, default=1536,
                        help="images timed per case (rounded down to whole batches)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="train steps timed per run")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--train-only", action="store_true",
                        help="only the train step, alone and fed (no pipeline-only cases)")
    parser.add_argument("--fed-extra", nargs="*", default=[],
                        help="more fed cases, NAME:MODE=JSON (train_dataset keyword arguments)")
    parser.add_argument("--full-decode", action="store_true",
                        help="also time torch decoding every JPEG at full size (no draft mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="grain,torch",
                        help="grain and torch, or grain alone (no torch needed)")
    # Set by the parent for a child (one case).
    parser.add_argument("--side", choices=("grain", "torch"))
    parser.add_argument("--mode", choices=MODES, default="decode")
    parser.add_argument("--files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft", type=int, default=1)
    parser.add_argument("--size", type=int)
    parser.add_argument("--crop-fraction", type=float)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--augment")
    a = parser.parse_args()
    if a.side:
        a.workers = a.workers[0]
        return child(a)
    with_torch = "torch" in parse_sides(parser, a.sides, ("grain", "torch"), required=("grain",))

    from absl import flags

    from jfacerec.data import sources
    from jfacerec.data.images import load_face

    flags.FLAGS.mark_as_parsed()
    config = load_config(a.config)
    config.dataset.check = False  # the scan's decode check: slow, and not part of the pipeline
    dataset = sources.get_dataset(config)
    train = dataset.train
    batch, size = config.batch_size, config.image_size
    timed = max(1, a.images // batch)
    n = (WARMUP_BATCHES + timed + TAIL_BATCHES) * batch
    if n > len(train):
        raise SystemExit(f"--images {a.images}: more than the {len(train)} training images")
    chosen = np.sort(np.random.default_rng(a.seed).choice(len(train), n, replace=False))
    files = train.files.subset(chosen)
    for p in files.paths:  # warm the page cache: the comparison is of decoding, not the disk
        with open(p, "rb") as f:
            f.read()
    augment = config.input.augment.to_dict()
    threads = config.input.num_threads
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"root": files.root, "names": list(files.names), "paths": list(files.paths),
                   "labels": files.labels.tolist()}, f)
        list_path = f.name
    common = [f"--files={list_path}", f"--size={size}",
              f"--crop-fraction={config.dataset.crop_fraction}", f"--batch={batch}",
              f"--augment={json.dumps(augment)}", f"--seed={a.seed}"]

    # grain variants: the config's num_threads with 0 workers, and 0 threads (reading in the
    # training thread); workers read on their own thread (train_dataset's worker_threads=0).
    variants = [(f"w{w}", w, threads) for w in a.workers]
    if 0 in a.workers and threads != 0:
        variants.insert(1, ("w0_0threads", 0, 0))
    cases = []  # (name, side, mode, workers, threads, draft), grain and torch interleaved
    for mode in MODES if not a.train_only else ():
        for name, w, t in variants:
            cases.append((f"grain/{mode}/{name}", "grain", mode, w, t, True))
            if name == f"w{w}" and with_torch:
                cases.append((f"torch/{mode}/w{w}", "torch", mode, w, threads, True))
                if a.full_decode and mode == "decode":
                    cases.append((f"torch/full_decode/w{w}", "torch", mode, w, threads, False))
    load_at_start = os.getloadavg()
    raw: dict[str, list[dict]] = {c[0]: [] for c in cases}
    started = time.perf_counter()
    try:
        for r in range(a.rounds):
            for name, side, mode, w, t, draft in cases if r % 2 == 0 else cases[::-1]:
                raw[name].append(run_case(common, side, mode, w, t, draft))
                print(f"round {r + 1}/{a.rounds} {name}: "
                      f"{raw[name][-1]['images_per_s']:.0f} images/s, "
                      f"{raw[name][-1]['cpu_ms_per_image']:.2f} CPU ms/image", flush=True)
    finally:
        os.unlink(list_path)
    pipeline_seconds = time.perf_counter() - started

    faces = InMemoryFaces(np.stack([load_face(p, crop_fraction=config.dataset.crop_fraction,
                                              size=size) for p in files.paths]), files.labels)
    fed = [(f"{mode}/{name}", mode, dict(num_workers=w, num_threads=t))
           for mode in MODES for name, w, t in variants]
    for extra in a.fed_extra:
        name, kwargs = extra.split("=", 1)
        fed.append((name, name.split(":")[1], json.loads(kwargs)))
    train_rates = train_step_rates(config, dataset, faces, a.steps, a.rounds, fed)
    train_alone = float(np.median(train_rates["alone"]))
    print(f"train step alone: {', '.join(f'{x:.0f}' for x in train_rates['alone'])} images/s "
          f"(compiled in {train_rates['compile_s']:.1f} s)", flush=True)

    med = {name: {k: float(np.median([x[k] for x in runs])) for k in runs[0]}
           for name, runs in raw.items()}
    by_mode = {}
    for mode in MODES:
        rows = {}
        for name, w, _ in variants:
            fed_rate = float(np.median(train_rates["fed"][f"{mode}/{name}"]))
            fed_ratio = float(np.median(train_rates["ratio_fed_to_alone"][f"{mode}/{name}"]))
            row = {"train_step_fed_images_per_s": fed_rate, "ratio_fed_to_alone": fed_ratio}
            if not a.train_only:
                g = med[f"grain/{mode}/{name}"]
                row = {"grain_images_per_s": g["images_per_s"],
                       "grain_cpu_ms_per_image": g["cpu_ms_per_image"],
                       "ratio_grain_to_train_step": g["images_per_s"] / train_alone, **row}
                if with_torch:
                    t = med[f"torch/{mode}/w{w}"]
                    row.update(torch_images_per_s=t["images_per_s"],
                               ratio_grain_to_torch=g["images_per_s"] / t["images_per_s"],
                               torch_cpu_ms_per_image=t["cpu_ms_per_image"],
                               ratio_torch_to_train_step=t["images_per_s"] / train_alone)
                if with_torch and a.full_decode and mode == "decode":
                    row["torch_full_decode_images_per_s"] = \
                        med[f"torch/full_decode/w{w}"]["images_per_s"]
            rows[name] = row
        by_mode[mode] = rows

    if not a.train_only:
        peers = "torch | grain/torch | " if with_torch else ""
        for mode in MODES:
            print(f"\n{mode}: images/s (CPU ms per image)\n"
                  f"| grain | grain | {peers}grain/train step | "
                  "train step fed by grain (/alone) |\n" + "| --- " * (4 + 2 * with_torch) + "|")
            for name, row in by_mode[mode].items():
                torch_cells = (f"{row['torch_images_per_s']:,.0f} "
                               f"({row['torch_cpu_ms_per_image']:.2f}) | "
                               f"{row['ratio_grain_to_torch']:.2f}x | " if with_torch else "")
                print(f"| {name} | {row['grain_images_per_s']:,.0f} "
                      f"({row['grain_cpu_ms_per_image']:.2f}) | {torch_cells}"
                      f"{row['ratio_grain_to_train_step']:.1f}x | "
                      f"{row['train_step_fed_images_per_s']:,.0f} "
                      f"({row['ratio_fed_to_alone']:.2f}) |")
    print(f"train step alone: {train_alone:,.0f} images/s\n")
    result = {
        "config": os.path.relpath(a.config, REPO), "image_size": size, "batch_size": batch,
        "crop_fraction": config.dataset.crop_fraction, "augment": augment,
        "num_threads": threads, "files_per_case": n, "timed_images_per_case": timed * batch,
        "rounds": a.rounds, "cpu_count": os.cpu_count(), "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(), **versions(with_torch),
        "pipeline_seconds": pipeline_seconds,
        "train_step_images_per_s": train_alone, "train_steps_timed": a.steps,
        "train_step_compile_s": train_rates["compile_s"],
        "train_step_alone_runs": train_rates["alone"], "train_step_fed_runs": train_rates["fed"],
        **by_mode,
        "cases": med,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
