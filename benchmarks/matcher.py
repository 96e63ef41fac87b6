"""Exact top-k cosine search: jfacerec's matcher against faiss-cpu (IndexFlatIP) and NumPy.

python benchmarks/matcher.py [--gallery 10000,100000,1000000] [--queries 1000,10000] [--k 1,5]
                             [--dim 512] [--repeats 3] [--sides jfacerec,faiss,numpy] [--quick]

Data: seeded Gaussian vectors, L2-normalised, float32, written once in chunks under --data-dir
(/tmp); each gallery size is a prefix of the largest, each query count a prefix of the largest.

Every (side, case) runs in its own worker subprocess so that its peak memory can be read on its own:
the worker imports its library and loads the data, takes its resident size as the baseline, resets
the kernel's high-water mark (/proc/self/clear_refs), then prepares the gallery (faiss: builds the
index, a copy; jfacerec: jax.device_put, a copy; NumPy: normalises in place) and makes one warm-up
call on a few queries (jfacerec compiles there). Peak memory is the high-water mark at the end minus
the baseline: everything the side needs beyond the input arrays. Gallery preparation is timed apart.

The workers of a case, and one more measuring the machine's float32 matmul rate (a jitted 4096^3
jnp.dot), then run in rounds: each round times one search by every side (the whole call, query
normalisation included), each just after one peak measurement, back to back, so that the load from
other work on a shared machine falls on all of them alike; rounds stop at --repeats or when another
would overrun --case-budget-s. Figures are medians over the rounds (the peak: over all its samples
in the case); each side's achieved rate 2 * queries * gallery * dim / time is reported as a fraction
of that case's peak.

A case whose queries x gallery exceeds --work-cap pairs is timed on its first 4096 * m queries
(m as large as the cap allows, at least 1; both jfacerec's 1,024-query and faiss's 4,096-query
blocks stay full) and reported as queries/s of those; the table marks it.

faiss runs with OPENBLAS_CORETYPE=SkylakeX (--faiss-openblas-coretype): the OpenBLAS bundled with
faiss-cpu does not recognise recent Xeons and otherwise uses its generic SSE3 kernels.

Correctness: every side's top-k scores must equal every other side's rank by rank within 1e-4
(indices may then differ only between near-ties) and match float64 cosines recomputed from the
returned indices within 1e-4.

Last line: JSON with every figure (per case and round), the load average before and after each
case, and a description of the machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable

import numpy as np
from tqdm import tqdm

from common import REPO, parse_sides

SIDES = ("jfacerec", "faiss", "numpy")
# Queries in the untimed warm-up call. jfacerec's is its default query block, so that it compiles the
# very program the timed calls run; faiss and NumPy compile nothing and only need their threads up
# (32 >= 20 keeps faiss on its BLAS path, the one the timed calls take).
WARMUP_QUERIES = {"jfacerec": 1024, "faiss": 32, "numpy": 32}
# Timed subsets of large cases are a multiple of this: faiss's query block (and 4 of jfacerec's).
QUERY_QUANTUM = 4096
TOLERANCE = 1e-4
# search(queries [n, d], k) -> (scores [n, k], indices [n, k]), best first.
Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


# --- data -----------------------------------------------------------------------------------------

def data_path(data_dir: str, name: str, rows: int, dim: int, seed: int) -> str:
    """Where the seeded [rows, dim] array called `name` is kept."""
    return os.path.join(data_dir, f"{name}_{rows}x{dim}_seed{seed}.npy")


def write_normalised(path: str, rows: int, dim: int, seed: int, chunk: int = 65536) -> None:
    """Writes seeded Gaussian float32 [rows, dim] with unit rows to `path`, `chunk` rows at a time."""
    if os.path.exists(path):
        return
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path + ".part", mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, chunk):
        x = rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + len(x)] = x
    out.flush()
    del out
    os.replace(path + ".part", path)


def read_rows(path: str, rows: int) -> np.ndarray:
    """The first `rows` rows of a 2-D .npy file, read straight into one fresh array.

    Reading (not memory-mapping) keeps the page cache out of the process's resident size.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        out = np.empty((rows, shape[1]), dtype)
        f.readinto(memoryview(out).cast("B"))
    return out


def timed_queries(nq: int, ng: int, work_cap: float) -> int:
    """How many of the case's nq queries are timed (all unless nq * ng > work_cap)."""
    if nq * ng <= work_cap:
        return nq
    return min(nq, max(1, int(work_cap // ng) // QUERY_QUANTUM) * QUERY_QUANTUM)


# --- the three sides (run inside a worker subprocess) ----------------------------------------------

def prepare(side: str, gallery: np.ndarray) -> Search:
    """One-off preparation of gallery [ng, d] for `side`; returns its search."""
    if side == "jfacerec":
        import jax

        from jfacerec.inference.matcher import top_k_cosine
        device_gallery = jax.block_until_ready(jax.device_put(gallery))
        return lambda q, k: top_k_cosine(q, device_gallery, k=k)
    if side == "faiss":
        import faiss
        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(gallery)

        def faiss_search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            q = q.copy()
            faiss.normalize_L2(q)
            return index.search(q, k)
        return faiss_search
    # In place, and norms by einsum: np.linalg.norm would square the whole gallery into a temporary.
    gallery /= np.sqrt(np.einsum("ij,ij->i", gallery, gallery))[:, None]
    # 2^26 scores (256 MiB) per query block.
    block = max(1, (1 << 26) // len(gallery))

    def numpy_search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        scores, indices = [], []
        for start in range(0, len(q), block):
            s = q[start:start + block] @ gallery.T  # [block, ng]
            if k == 1:  # argmax is what NumPy code would use, and cheaper than argpartition
                idx = s.argmax(axis=1)[:, None]
            else:
                idx = np.argpartition(s, -k, axis=1)[:, -k:]
            top = np.take_along_axis(s, idx, axis=1)
            order = np.argsort(-top, axis=1, kind="stable")
            scores.append(np.take_along_axis(top, order, axis=1))
            indices.append(np.take_along_axis(idx, order, axis=1))
        return np.concatenate(scores), np.concatenate(indices)
    return numpy_search


def memory_mib(field: str) -> float:
    """VmRSS or VmHWM of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def side_worker(task: dict) -> tuple[dict, Callable[[], dict], Callable[[], dict]]:
    """One side on one case (see the module docstring): (setup figures, run, finish).

    run() times one search of the case's queries; finish() saves the last result to task['out']
    and returns the peak memory.
    """
    # Libraries are imported before the baseline: their code is not the search's working memory.
    if task["side"] == "jfacerec":
        import jfacerec.inference.matcher  # noqa: F401
    elif task["side"] == "faiss":
        import faiss  # noqa: F401
    gallery = read_rows(task["gallery_path"], task["ng"])
    queries = read_rows(task["queries_path"], task["nq_timed"])
    baseline = memory_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    t = time.perf_counter()
    search = prepare(task["side"], gallery)
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    search(queries[:WARMUP_QUERIES[task["side"]]], task["k"])
    first_call_s = time.perf_counter() - t
    last = []

    def run() -> dict:
        t = time.perf_counter()
        result = search(queries, task["k"])
        elapsed = time.perf_counter() - t
        last[:] = result
        return {"time_s": elapsed}

    def finish() -> dict:
        np.savez(task["out"], scores=np.asarray(last[0], np.float32),
                 indices=np.asarray(last[1], np.int64))
        return {"peak_mib": memory_mib("VmHWM") - baseline, "baseline_mib": baseline}

    return {"setup_s": setup_s, "first_call_s": first_call_s}, run, finish


def peak_worker(task: dict) -> tuple[dict, Callable[[], dict], Callable[[], dict]]:
    """The machine's matmul rate: run() times one jitted float32 [size, size] @ [size, size] jnp.dot."""
    import jax
    import jax.numpy as jnp
    size = task["size"]
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))

    def run() -> dict:
        t = time.perf_counter()
        jax.block_until_ready(dot(a, a))
        return {"time_s": time.perf_counter() - t}

    return {}, run, dict


def serve(task: dict) -> None:
    """Worker main loop: sets up, then answers each stdin line ('run' or 'finish') with a JSON line."""
    ready, run, finish = (peak_worker if task["side"] == "peak" else side_worker)(task)
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(run()), flush=True)
        else:
            print(json.dumps(finish()), flush=True)
            return


class Worker:
    """This script run as a worker subprocess on `task`, set up and waiting for commands."""

    def __init__(self, task: dict, env: dict[str, str] | None = None):
        self.task = task
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(task)], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.task} exited with status {self.proc.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def finish(self) -> dict:
        out = self.ask("finish")
        self.proc.wait()
        return out


def run_case(ng: int, nq_timed: int, k: int, sides: list[str], args: argparse.Namespace,
             paths: tuple[str, str], faiss_env: dict[str, str]) -> dict[str, dict]:
    """Times every side and the matmul peak on one case in interleaved rounds.

    Returns {side or "peak": {"times_s": [...], "median_s", ... setup and memory figures}}.
    """
    workers = {"peak": Worker({"side": "peak", "size": args.peak_size})}
    for side in sides:  # one at a time, so that set-ups and warm-ups do not compete
        task = {"side": side, "ng": ng, "nq_timed": nq_timed, "k": k, "gallery_path": paths[0],
                "queries_path": paths[1], "out": os.path.join(args.data_dir, f"result_{side}.npz")}
        workers[side] = Worker(task, faiss_env if side == "faiss" else None)
    times = {name: [] for name in workers}
    start = time.perf_counter()
    for round_ in itertools.count():
        round_start = time.perf_counter()
        # Every round: each side, who goes first rotating from round to round, just after a peak
        # measurement, so that the peak samples are spread over the same time as the searches.
        for side in sides[round_ % len(sides):] + sides[:round_ % len(sides)]:
            for name in ("peak", side):
                times[name].append(workers[name].ask("run")["time_s"])
        now = time.perf_counter()
        if round_ + 1 >= args.repeats or now - start + (now - round_start) > args.case_budget_s:
            break
    return {name: {"times_s": times[name], "median_s": float(np.median(times[name])),
                   **w.ready, **w.finish(), **({"out": w.task["out"]} if name != "peak" else {})}
            for name, w in workers.items()}


# --- correctness ----------------------------------------------------------------------------------

def check(outputs: dict[str, str], gallery_path: str, queries_path: str) -> dict:
    """Cross-checks the sides' top-k saved in {side: .npz path} (see the module docstring)."""
    saved = {side: dict(np.load(path)) for side, path in outputs.items()}
    gallery = np.load(gallery_path, mmap_mode="r")
    nq = next(iter(saved.values()))["indices"].shape[0]
    queries = np.load(queries_path, mmap_mode="r")[:nq].astype(np.float64)
    out = {"ok": True}
    for side, s in saved.items():
        rows = gallery[s["indices"].ravel()].astype(np.float64).reshape(*s["indices"].shape, -1)
        cosine = np.einsum("qd,qkd->qk", queries, rows) / (
            np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(rows, axis=2))
        err = float(np.abs(cosine - s["scores"]).max())
        out[f"{side}_score_error"] = err
        out["ok"] &= err <= TOLERANCE
    for a, b in itertools.combinations(saved, 2):
        diff = float(np.abs(saved[a]["scores"] - saved[b]["scores"]).max())
        out[f"{a}_vs_{b}_max_score_diff"] = diff
        out[f"{a}_vs_{b}_index_agreement"] = float(
            (saved[a]["indices"] == saved[b]["indices"]).mean())
        out["ok"] &= diff <= TOLERANCE
    out["ok"] = bool(out["ok"])
    return out


# --- report ---------------------------------------------------------------------------------------

def machine() -> dict:
    """CPU count and model, platform, library versions and the date."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("jax", "jaxlib", "faiss-cpu", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def print_tables(cases: list[dict], sides: list[str]) -> None:
    """Markdown tables: queries/s and ratios, achieved GFLOP/s against the peak, peak memory."""
    def name(c: dict) -> str:
        timed = "" if c["timed_queries"] == c["queries"] else f" ({c['timed_queries']:,}*)"
        return f"{c['gallery']:,} | {c['queries']:,}{timed} | {c['k']}"

    ratios = [f"jfacerec/{s}" for s in sides if s != "jfacerec" and "jfacerec" in sides]
    print("| gallery | queries | k | " + " | ".join(f"{s} queries/s" for s in sides)
          + "".join(f" | {r}" for r in ratios) + " | top-k agree |")
    print("| --- " * (4 + len(sides) + len(ratios)) + "|")
    for c in cases:
        print(f"| {name(c)} | " + " | ".join(f"{c[s]['queries_per_s']:,.0f}" for s in sides)
              + "".join(f" | {c[r]:.2f}x" for r in ratios)
              + f" | {'yes' if c['check']['ok'] else 'NO'} |")
    print("\nAchieved GFLOP/s (2 * queries * gallery * dim / time) and its % of the peak: the "
          "jitted float32 jnp.dot measured in the same rounds\n")
    print("| gallery | queries | k | peak | " + " | ".join(sides) + " |")
    print("| --- " * (4 + len(sides)) + "|")
    for c in cases:
        print(f"| {name(c)} | {c['peak']['flops_per_s'] / 1e9:.0f} | " + " | ".join(
            f"{c[s]['flops_per_s'] / 1e9:.0f} ({100 * c[s]['fraction_of_peak']:.0f}%)"
            for s in sides) + " |")
    print("\nPeak memory above the input arrays, MiB (gallery preparation, seconds):\n")
    print("| gallery | queries | k | " + " | ".join(sides) + " |")
    print("| --- " * (3 + len(sides)) + "|")
    for c in cases:
        print(f"| {name(c)} | " + " | ".join(
            f"{c[s]['peak_mib']:,.0f} ({c[s]['setup_s']:.2f} s)" for s in sides) + " |")
    if any(c["timed_queries"] != c["queries"] for c in cases):
        print("\n* timed on the first N queries (--work-cap); queries/s are of those.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", default="10000,100000,1000000")
    parser.add_argument("--queries", default="1000,10000")
    parser.add_argument("--k", default="1,5")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds per case, fewer once a case has used --case-budget-s")
    parser.add_argument("--case-budget-s", type=float, default=60.0,
                        help="no further round once the next would end past this (all sides)")
    parser.add_argument("--work-cap", type=float, default=4.2e9,
                        help="query x gallery pairs above which a case times a subset of queries")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--peak-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faiss-openblas-coretype", default="SkylakeX",
                        help="OPENBLAS_CORETYPE for the faiss worker ('' to leave OpenBLAS to detect "
                             "the CPU): faiss-cpu 1.15.1's bundled OpenBLAS 0.3.15 does not know "
                             "Sapphire Rapids and falls back to its SSE3 (Prescott) kernels, 2-3x "
                             "slower")
    parser.add_argument("--data-dir", default="/tmp/jfacerec_matcher_bench")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: gallery 10000, queries 1000, repeats 1, peak 2048")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, REPO)
        serve(json.loads(args.worker))
        return
    if args.quick:
        args.gallery, args.queries, args.repeats, args.peak_size = "10000", "1000", 1, 2048
    galleries = [int(x) for x in args.gallery.split(",")]
    query_counts = [int(x) for x in args.queries.split(",")]
    ks = [int(x) for x in args.k.split(",")]
    sides = parse_sides(parser, args.sides, SIDES)

    os.makedirs(args.data_dir, exist_ok=True)
    paths = (data_path(args.data_dir, "gallery", max(galleries), args.dim, args.seed),
             data_path(args.data_dir, "queries", max(query_counts), args.dim, args.seed + 1))
    write_normalised(paths[0], max(galleries), args.dim, args.seed)
    write_normalised(paths[1], max(query_counts), args.dim, args.seed + 1)
    faiss_env = dict(os.environ)
    if args.faiss_openblas_coretype:
        faiss_env["OPENBLAS_CORETYPE"] = args.faiss_openblas_coretype

    cases = []
    for ng, nq, k in tqdm(list(itertools.product(galleries, query_counts, ks)), desc="cases",
                          file=sys.stderr):
        nq_timed = timed_queries(nq, ng, args.work_cap)
        case = {"gallery": ng, "queries": nq, "timed_queries": nq_timed, "k": k,
                "load_average_before": os.getloadavg()[0]}
        results = run_case(ng, nq_timed, k, sides, args, paths, faiss_env)
        case["load_average_after"] = os.getloadavg()[0]
        case["check"] = check({side: results[side].pop("out") for side in sides}, *paths)
        case["peak"] = results["peak"]
        case["peak"]["flops_per_s"] = 2 * args.peak_size**3 / case["peak"]["median_s"]
        for side in sides:
            r = results[side]
            r["queries_per_s"] = nq_timed / r["median_s"]
            r["flops_per_s"] = 2 * nq_timed * ng * args.dim / r["median_s"]
            r["fraction_of_peak"] = r["flops_per_s"] / case["peak"]["flops_per_s"]
            case[side] = r
        for other in sides:
            if other != "jfacerec" and "jfacerec" in sides:
                case[f"jfacerec/{other}"] = (case["jfacerec"]["queries_per_s"]
                                             / case[other]["queries_per_s"])
        cases.append(case)
    print_tables(cases, sides)
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                      "peak_matmul_flops_per_s": max(c["peak"]["flops_per_s"] for c in cases),
                      "machine": machine(), "cases": cases}))


if __name__ == "__main__":
    main()
