"""The benchmark scripts, or their sides that need neither torch nor faiss, still run at their
smallest sizes.

Nothing else imports them, so an API change elsewhere would otherwise break them unnoticed (one
did: benchmarks/synthetic.py after training.init_state gained its objective argument). Their
speed is not checked here, only that each run ends in its JSON line, what that line says about
correctness, and how its figures relate to each other.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import LFW, REPO, load_config, needs_lfw
from jfacerec import models
from jfacerec.core import config_base
from jfacerec.models import summary


def run_benchmark(script: str, *args: str) -> dict:
    """Runs benchmarks/<script> with args; returns its last line, parsed as JSON."""
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_synthetic_pipeline_benchmark_reports_each_thread_count():
    result = run_benchmark("synthetic.py", "--config", "configs/demo.py:runlocal", "--steps", "2",
                           "--threads", "0,1")
    assert [p["num_threads"] for p in result["pipeline"]] == [0, 1]
    for p in result["pipeline"]:
        assert p["first_epoch_images_per_s"] > 0 and p["cached_images_per_s"] > 0
        assert p["ratio_cached_to_train"] == (p["cached_images_per_s"]
                                              / result["train_step_images_per_s"])


def test_sharded_gallery_benchmark_matches_the_single_device_search():
    result = run_benchmark("gallery_sharded.py", "--rows", "4096", "--queries", "64",
                           "--repeats", "1", "--devices", "4")
    assert result["machine"]["devices"] == 4
    speed = result["speed"]
    assert speed["indices_equal"] and speed["scores_equal"]
    assert speed["queries_compared"] == 64


def test_train_step_benchmark_times_our_variants_without_torch():
    result = run_benchmark("train_step.py", "--quick", "--models", "resnet_tiny", "--sides", "jax")
    assert "torch" not in result["machine"]
    r = result["results"]["resnet_tiny"]
    assert r["parameters"] == 728_156  # the base config's network, the count its torch peer matches
    variants = ("ours", "default_xla_options", "lax_convs_default_xla_options")
    for v in variants:
        rate = r[f"jax_{v}_images_per_s"]
        assert rate > 0 and f"ratio_jax_{v}_to_torch_best" not in r
        assert r[f"jax_{v}_mfu"] == r["flops_per_image"] * rate / result["peak_flops"]
    # The step's FLOPs (forward, backward, update) from XLA against one forward pass.
    config = config_base.base_config()
    forward = summary.totals(models.from_config(config, config.dataset.num_identities),
                             config.image_size)["flops"]
    assert 2.0 < r["flops_per_image"] / forward < 3.5


def test_matcher_benchmark_agrees_with_numpy_without_faiss():
    result = run_benchmark("matcher.py", "--gallery", "2000,3000", "--queries", "100", "--k", "1,5",
                           "--repeats", "1", "--peak-size", "256", "--sides", "jfacerec,numpy")
    cases = result["cases"]
    assert [(c["gallery"], c["k"]) for c in cases] == [(2000, 1), (2000, 5), (3000, 1), (3000, 5)]
    for case in cases:
        assert case["check"]["ok"]
        assert case["check"]["jfacerec_vs_numpy_index_agreement"] == 1.0
        assert case["check"]["jfacerec_score_error"] < 1e-5
        assert case["jfacerec"]["queries_per_s"] > 0 and "faiss" not in case


@needs_lfw
def test_pipeline_benchmark_times_grain_and_the_step_it_feeds_without_torch():
    result = run_benchmark("pipeline.py", "--images", "128", "--rounds", "1", "--steps", "2",
                           "--workers", "0", "--sides", "grain")
    assert "torch" not in result and result["timed_images_per_case"] == 128
    alone = result["train_step_images_per_s"]
    for mode in ("decode", "cached"):
        row = result[mode]["w0"]
        assert "torch_images_per_s" not in row
        assert row["ratio_grain_to_train_step"] == row["grain_images_per_s"] / alone
        assert row["grain_images_per_s"] > 0 and row["train_step_fed_images_per_s"] > 0


@needs_lfw
def test_packed_benchmark_runs_on_lfw():
    result = run_benchmark("packed.py", "--records", "64", "--repeats", "1")
    assert result["records"] == 64
    assert all(rate > 0 for rate in result["rates"].values())


def view1_sample(path):
    """pairsDevTest.txt's first 20 matched and first 20 mismatched pairs, written to `path`."""
    with open(os.path.join(os.path.dirname(LFW), "pairsDevTest.txt")) as f:
        lines = f.read().splitlines()
    path.write_text("\n".join(["20", *lines[1:21], *lines[501:521]]) + "\n")
    return path


@needs_lfw
def test_time_to_accuracy_benchmark_snapshots_both_sides_within_the_budget(tmp_path):
    # 40 of View 1's pairs (scored in a second), training on the people with 20 images or more.
    pairs = view1_sample(tmp_path / "pairs.txt")
    minutes = (0.05, 0.1)
    result = run_benchmark(
        "time_to_accuracy.py", "--config", "configs/lfw.py:runlocal",
        "--minutes", ",".join(map(str, minutes)), "--out-dir", str(tmp_path / "out"),
        *[arg for item in ("image_size=16", "model.width_multiplier=1.0", "dataset.min_images=20",
                           "dataset.check=False", f"dataset.pairs={pairs}")
          for arg in ("--set", item)])
    sides = ("jfacerec", "torch")
    keys = [str(m) for m in minutes]
    assert list(result["accuracy"]) == keys and list(result["elapsed_seconds"]) == keys
    for side in sides:
        assert result["steps"][side] > 0 and result["images_per_second"][side] > 0
        elapsed = [result["elapsed_seconds"][k][side] for k in keys]
        # jfacerec's clock holds its compilation: seconds beyond the budget on a busy machine.
        assert 0 < elapsed[0] < elapsed[1] < 60 * minutes[-1] + 120
        steps = [result["snapshot_steps"][k][side] for k in keys]
        assert steps == [result["steps"][side] // 2, result["steps"][side]]
        for key in keys:
            for figure in ("accuracy", "auc", "tar@far=1e-3"):
                assert 0.0 <= result[figure][key][side] <= 1.0
    assert len(result["load"]["before"]) == len(result["load"]["after"]) == 3
    assert result["machine"]["cpu_count"] > 0
    saved = json.loads((tmp_path / "out" / "time_to_accuracy.json").read_text())
    assert saved == result and (tmp_path / "out" / "time_to_accuracy.png").stat().st_size > 0


@needs_lfw
def test_wccn_benchmark_rescores_a_protocol_workdir_as_the_protocol_scores_it(tmp_path):
    from jfacerec.evaluation import lfw

    # 40 of View 1's pairs, training on the people with 20 images or more, 4 steps.
    pairs = view1_sample(tmp_path / "pairs.txt")
    config = load_config("lfw.py:runlocal")
    config.update(image_size=16, total_steps=4, checkpoint_every_steps=4, num_devices=1)
    config.dataset.update(root=LFW, pairs=str(pairs), min_images=20, check=False)
    protocol = lfw.run(config, str(tmp_path / "w"))
    result = run_benchmark("lfw_wccn.py", str(tmp_path / "w"), "--shrinkage",
                           f"{config.eval.wccn},1.0")
    rows = result["workdirs"][str(tmp_path / "w")]
    assert list(rows) == ["cosine", str(config.eval.wccn), "1.0"]
    for name, protocol_figures in (("cosine", protocol["without_wccn"]),
                                   (str(config.eval.wccn), protocol)):
        assert rows[name]["accuracy"] == pytest.approx(protocol_figures["accuracy_mean"], abs=1e-6)
        assert rows[name]["auc"] == pytest.approx(protocol_figures["auc"], abs=1e-6)
    for name, change in result["mean_change"].items():
        for figure, value in change.items():
            assert value == pytest.approx(rows[name][figure] - rows["cosine"][figure])


@pytest.mark.parametrize("pool,embedding_norm,width", [("mean", "", 1.0),
                                                       ("flatten", "batch", 1.5)])
def test_the_torch_peer_starts_where_jfacerec_starts(pool, embedding_norm, width):
    """Weights of each shape drawn with the same spread on both sides, the same zero norm scales:
    the time-to-accuracy comparison then trains one recipe, not two initialisations. With the
    flatten pool the embedding's kernel has a row per position and channel (2 x 2 x 192 at 32
    px and width 1) on both sides; with an embedding norm both have its 128 unit scales."""
    import collections

    import jax
    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import torch_peers

    config = config_base.base_config()
    config.model.update(name="resnet_tiny", norm="batch", width_multiplier=width, dropout=0.0,
                        pool=pool, embedding_norm=embedding_norm)
    config.loss.name = "cosface"
    classes = 300
    torch.manual_seed(0)
    peer = torch_peers.torch_model(config, classes)
    model = models.from_config(config, classes)
    variables = model.init(jax.random.key(0), np.zeros((2, 32, 32, 3), np.float32), train=False)

    def spread(weights) -> dict:
        groups = collections.defaultdict(list)
        for shape, values in weights:
            groups[shape].append(np.ravel(values))
        return {shape: float(np.std(np.concatenate(v))) for shape, v in groups.items()}

    ours, theirs = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        leaf = np.asarray(leaf)
        key = jax.tree_util.keystr(path)
        if leaf.ndim == 4:  # [kh, kw, in, out] -> torch's [out, in, kh, kw]
            ours.append((leaf.transpose(3, 2, 0, 1).shape, leaf))
        elif leaf.ndim == 2:  # [in, out] -> [out, in]
            ours.append((leaf.T.shape, leaf))
        elif "scale" in key:
            ours.append((("scale", leaf.size, float(leaf.mean())), leaf))
    for name, p in peer.named_parameters():
        p = p.detach().numpy()
        if p.ndim in (2, 4):
            theirs.append((p.shape, p))
        elif ("norm" in name or name.startswith("features")) and name.endswith("weight"):
            theirs.append((("scale", p.size, float(p.mean())), p))
    ours, theirs = spread(ours), spread(theirs)
    assert sorted(ours, key=str) == sorted(theirs, key=str)
    assert (128, round(192 * width) * (4 if pool == "flatten" else 1)) in theirs
    assert (("scale", 128, 1.0) in theirs) == bool(embedding_norm)
    for shape, std in ours.items():
        assert abs(theirs[shape] - std) <= 0.1 * std + 1e-9, (shape, std, theirs[shape])
