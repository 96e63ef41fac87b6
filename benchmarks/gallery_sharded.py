"""Sharded gallery search: memory per device and speed of a 1M x 512 gallery split over 8 devices.

python benchmarks/gallery_sharded.py [--rows 125000,250000,500000,1000000] [--queries 1000] [--k 5]
                                     [--dim 512] [--devices 8] [--repeats 2] [--seed 0]

Runs on the CPU with --devices forced host devices (XLA_FLAGS is set here, before JAX starts).
One seeded Gaussian float32 gallery of the largest size is made in host memory; each size in --rows
is a prefix of it. For each size, `shard_gallery` places the rows on a mesh of all the devices, and
the sharded search program `top_k_cosine` runs for one query block is compiled; reported per device:
the gallery shard (bytes of each device's `addressable_shards` entry) and the program's
`memory_analysis()` (arguments: the shard plus the replicated queries; temporaries: the working set,
which should stay at about query_block x gallery_chunk scores however large the gallery; outputs).
The same is compiled for one device holding the largest gallery whole, for comparison.

Speed, on the largest gallery: `top_k_cosine` over the ShardedGallery against `top_k_cosine` over
the same rows as a single-device jax.Array (copied from the shards once the host gallery is freed,
so that at most two gallery copies exist), one first call each (compilation included), then
--repeats rounds that time one search of each, back to back, so that load from other work on a
shared machine falls on both alike. Both sides must return the same indices and bit-identical
scores for every query. Process memory: peak RSS (getrusage) after the sharded search, before the
single-device copy exists (host gallery, shards, every device's working set), and at the end.

Last line: JSON with every figure.
"""

from __future__ import annotations

import argparse
import os
import sys

DEVICES_FLAG = "--xla_force_host_platform_device_count"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="125000,250000,500000,1000000",
                        help="gallery sizes, each a prefix of the largest")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


# Parsed before JAX is imported: the device count must be in XLA_FLAGS when JAX starts.
ARGS = parse_args()
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICES_FLAG}={ARGS.devices}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from common import REPO  # noqa: E402
sys.path.insert(0, REPO)

from jfacerec.inference import matcher  # noqa: E402
from jfacerec.core.parallel import make_mesh  # noqa: E402

MIB = 2 ** 20
# top_k_cosine's defaults, which the compiled programs measured here must match.
GALLERY_CHUNK = 4096
QUERY_BLOCK = 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def gaussian(rows: int, dim: int, rng: np.random.Generator, step: int = 65536) -> np.ndarray:
    """Seeded float32 [rows, dim], filled in place a block at a time (no float64 temporary)."""
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, step):
        rng.standard_normal(out=out[start:start + step], dtype=np.float32)
    return out


def memory(compiled) -> dict:
    """Per-device figures of a compiled program, MiB."""
    m = compiled.memory_analysis()
    return {"arguments_mib": m.argument_size_in_bytes / MIB, "temporaries_mib":
            m.temp_size_in_bytes / MIB, "outputs_mib": m.output_size_in_bytes / MIB}


def sharded_case(gallery: np.ndarray, mesh, queries: np.ndarray, k: int) -> tuple[dict, object]:
    """Places gallery on the mesh and compiles the sharded search; returns (figures, ShardedGallery)."""
    start = time.perf_counter()
    sharded = matcher.shard_gallery(gallery, mesh)
    jax.block_until_ready(sharded.rows)
    placed_s = time.perf_counter() - start
    shard_bytes = sorted({s.data.nbytes for s in sharded.rows.addressable_shards})
    shard_rows = sorted({s.data.shape[0] for s in sharded.rows.addressable_shards})
    ng = len(gallery)
    block = min(QUERY_BLOCK, len(queries))
    chunk = matcher._chunk_rows(ng, GALLERY_CHUNK)
    # The very program top_k_cosine runs for each query block (a private function: no public
    # handle on the compiled program exists).
    compiled = matcher._sharded_top_k_block.lower(
        jax.device_put(queries[:block], NamedSharding(mesh, P())), sharded.rows, mesh=mesh, k=k,
        chunk=chunk, size=ng).compile()
    return {"rows": ng, "devices": mesh.size, "rows_per_device": shard_rows,
            "shard_mib_per_device": [b / MIB for b in shard_bytes], "chunk_rows": chunk,
            "query_block": block, **memory(compiled), "place_s": placed_s,
            "rss_after_placing_mib": rss_mib()}, sharded


def timed(search, queries: np.ndarray) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    start = time.perf_counter()
    result = search(queries)
    return time.perf_counter() - start, result


def main() -> None:
    args = ARGS
    sizes = sorted(int(x) for x in args.rows.split(","))
    if len(jax.devices()) != args.devices:
        sys.exit(f"expected {args.devices} CPU devices, JAX has {len(jax.devices())}")
    mesh = make_mesh(args.devices)
    started = time.perf_counter()
    load_before = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    gallery = gaussian(sizes[-1], args.dim, rng)
    queries = gaussian(args.queries, args.dim, rng)
    rss_host_gallery = rss_mib()
    print(f"{args.devices} CPU devices; host gallery {sizes[-1]:,} x {args.dim} float32 "
          f"({gallery.nbytes / MIB:,.0f} MiB); RSS {rss_host_gallery:,.0f} MiB", flush=True)

    # --- memory per device, gallery size by gallery size ------------------------------------------
    cases, sharded = [], None
    for ng in sizes:
        del sharded  # one placed gallery at a time
        gc.collect()
        case, sharded = sharded_case(gallery[:ng], mesh, queries, args.k)
        cases.append(case)
        print(f"{ng:>9,} rows: {case['rows_per_device']} rows, "
              f"{case['shard_mib_per_device']} MiB per device; per-device arguments "
              f"{case['arguments_mib']:.1f} MiB, temporaries {case['temporaries_mib']:.1f} MiB",
              flush=True)
    ng = sizes[-1]
    single_program = matcher._top_k_block.lower(
        jax.ShapeDtypeStruct((min(QUERY_BLOCK, args.queries), args.dim), np.float32),
        jax.ShapeDtypeStruct((ng, args.dim), np.float32), k=args.k,
        chunk=matcher._chunk_rows(ng, GALLERY_CHUNK)).compile()
    single_memory = memory(single_program)

    # --- speed on the largest gallery ---------------------------------------------------------------
    def search_sharded(q):
        return matcher.top_k_cosine(q, sharded, k=args.k)

    first_sharded_s, _ = timed(search_sharded, queries)
    peak_rss_sharded = peak_rss_mib()
    # The single-device copy is made from the shards once the host gallery is gone: two copies.
    del gallery
    gc.collect()
    rows = jax.device_put(sharded.rows, jax.devices()[0])
    single = jax.block_until_ready(rows if rows.shape[0] == ng else rows[:ng])
    del rows

    def search_single(q):
        return matcher.top_k_cosine(q, single, k=args.k)

    first_single_s, _ = timed(search_single, queries)
    rounds = []
    for r in range(args.repeats):
        sharded_s, got = timed(search_sharded, queries)
        single_s, want = timed(search_single, queries)
        rounds.append({"sharded_s": sharded_s, "single_s": single_s})
        print(f"round {r + 1}: sharded {sharded_s:.1f} s, single device {single_s:.1f} s",
              flush=True)
    indices_equal = bool(np.array_equal(got[1], want[1]))
    scores_equal = bool(np.array_equal(got[0], want[0]))
    sharded_s = float(np.median([r["sharded_s"] for r in rounds]))
    single_s = float(np.median([r["single_s"] for r in rounds]))
    speed = {"rows": ng, "queries": args.queries, "k": args.k,
             "sharded_queries_per_s": args.queries / sharded_s,
             "single_queries_per_s": args.queries / single_s,
             "sharded_over_single": single_s / sharded_s,
             "first_call_s": {"sharded": first_sharded_s, "single": first_single_s},
             "rounds": rounds, "indices_equal": indices_equal, "scores_equal": scores_equal,
             "queries_compared": args.queries}

    print()
    print("| gallery rows | rows per device | gallery shard per device | arguments per device | "
          "temporaries per device | outputs per device | process RSS after placing |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c in cases:
        print(f"| {c['rows']:,} | {', '.join(f'{r:,}' for r in c['rows_per_device'])} | "
              f"{', '.join(f'{m:.1f}' for m in c['shard_mib_per_device'])} MiB | "
              f"{c['arguments_mib']:.1f} MiB | {c['temporaries_mib']:.1f} MiB | "
              f"{c['outputs_mib'] * 1024:.0f} KiB | {c['rss_after_placing_mib']:,.0f} MiB |")
    print(f"| {ng:,} on 1 device | {ng:,} | {ng * args.dim * 4 / MIB:.1f} MiB | "
          f"{single_memory['arguments_mib']:.1f} MiB | {single_memory['temporaries_mib']:.1f} MiB |"
          f" {single_memory['outputs_mib'] * 1024:.0f} KiB | |")
    print()
    print(f"{ng:,} x {args.dim}, {args.queries:,} queries, k = {args.k}: sharded over "
          f"{args.devices} devices {speed['sharded_queries_per_s']:.1f} queries/s, one device "
          f"{speed['single_queries_per_s']:.1f} queries/s ({speed['sharded_over_single']:.2f}x); "
          f"indices equal: {indices_equal}, scores bit-identical: {scores_equal}")
    print(f"peak RSS: {peak_rss_sharded:,.0f} MiB after the sharded search (host gallery + shards), "
          f"{peak_rss_mib():,.0f} MiB at the end")
    print(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "jax": jax.__version__,
                    "devices": args.devices, "load_before": load_before,
                    "load_after": os.getloadavg()},
        "seconds": time.perf_counter() - started, "dim": args.dim, "gallery_chunk": GALLERY_CHUNK, "per_device": cases,
        "single_device": {"rows": ng, **single_memory}, "speed": speed,
        "rss_mib": {"host_gallery": rss_host_gallery, "peak_after_sharded_search":
                    peak_rss_sharded, "peak_at_end": peak_rss_mib()}}))


if __name__ == "__main__":
    main()
