"""The .bin route against the LFW protocol on the same pairs: do they give the same figure?

python benchmarks/bin_vs_lfw.py [--workdir W] [--steps 300] [--image-size 32] [--out-dir /tmp/x]

1. A model: --workdir W (any trained workdir), or else one trained here with configs/lfw.py
   (--steps steps at --image-size) on the LFW people outside pairsDevTest.txt's pairs, as the LFW
   protocol's View 1 fold trains it.
2. lfw.bin from $JFACEREC_DATA/lfw/pairsDevTest.txt by `python -m jfacerec.data.bin`, preprocessed
   as the LFW protocol preprocesses its images: the model's crop_fraction, resized to its
   image_size, stored as PNG (lossless), so that the .bin's pixels are the protocol's pixels.
   A second pack, insightface's way (JPEG at quality 95, 112 x 112, resized to the model's size
   when read), shows what lossy storage and a second resize change.
3. The model on both: `python -m jfacerec.evaluate --bin lfw.bin` (bin/lfw/...), and the LFW
   protocol's scoring of the pairs (jfacerec.evaluation.lfw: score_pairs, fold_accuracies).

The two accuracies differ in two rules, not in the data. The threshold: the protocol applies,
to each tenth of the pairs, the exact best threshold on the other nine tenths
(jfacerec.metrics.kfold_accuracy: midway between two scores); the .bin figure is arcface_torch's,
the best of insightface's grid of thresholds 0, 0.01, ..., 3.99 on the squared distance (0.005
apart in cosine). The tenths: arcface_torch's are ten consecutive blocks of 100 pairs; the
protocol's each take a tenth of the matched pairs and a tenth of the mismatched ones
(jfacerec.metrics.stratified_folds). pairsDevTest lists its 500 matched pairs before its 500
mismatched ones, so each consecutive block holds one kind only: its threshold is chosen on pairs
of which 5/9 are of the other kind, biased against the held-out kind (a weak model scores below
chance). insightface's lfw.bin is built from View 2's pairs.txt, whose ten folds mix both kinds.
The script therefore also applies each rule, on consecutive blocks, to the other route's scores:
same rule, same pairs, same pixels must give the same figure.

Last line: JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("JFACEREC_DATA", os.path.join(REPO, "..", "shared", "data"))


def pack(pairs: str, root: str, out: str, *flags: str) -> float:
    """Runs the pack command; returns its seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jfacerec.data.bin", f"--pairs={pairs}",
                    f"--images={root}", f"--out={out}", *flags], check=True, cwd=REPO)
    return time.perf_counter() - start


def evaluate_bins(workdir: str, bins: list[str], out_dir: str) -> dict:
    """`python -m jfacerec.evaluate --config <the workdir's config> --workdir W --bin ...`."""
    config = os.path.join(out_dir, "workdir_config.py")
    with open(config, "w") as f:
        f.write(f"from jfacerec.core import workdir\n\n\ndef get_config():\n"
                f"    return workdir.read_config({workdir!r})\n")
    subprocess.run([sys.executable, "-m", "jfacerec.evaluate", f"--config={config}",
                    f"--workdir={workdir}", f"--bin={','.join(bins)}"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="a trained workdir (default: train one here)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out-dir", default=None, help="where the model and .bin files go "
                        "(default: a temporary folder)")
    args = parser.parse_args()

    from jfacerec import metrics
    from jfacerec.core import config_base
    from jfacerec.core import workdir as workdir_files
    from jfacerec.data.bin import read_bin
    from jfacerec.data.pairs import read_lfw_pairs
    from jfacerec.evaluation import bin_sets, lfw
    from jfacerec.inference.restore import restore

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="bin_vs_lfw_")
    os.makedirs(out_dir, exist_ok=True)
    root = os.path.join(DATA, "lfw", "lfw-deepfunneled")
    pairs_file = os.path.join(DATA, "lfw", "pairsDevTest.txt")
    workdir = args.workdir
    train_seconds = 0.0
    if workdir is None:
        from jfacerec.training import train

        config = config_base.load(os.path.join(REPO, "configs", "lfw.py"))
        config.image_size, config.total_steps = args.image_size, args.steps
        config.checkpoint_every_steps = args.steps
        config.dataset.update(root=root, pairs=pairs_file)
        workdir = os.path.join(out_dir, "model")
        start = time.perf_counter()
        train(config, workdir)
        train_seconds = time.perf_counter() - start
    config = workdir_files.read_config(workdir)

    protocol_bin = os.path.join(out_dir, "lfw.bin")
    insightface_dir = os.path.join(out_dir, "insightface")
    os.makedirs(insightface_dir, exist_ok=True)
    insightface_bin = os.path.join(insightface_dir, "lfw_jpeg112.bin")
    pack_seconds = pack(pairs_file, root, protocol_bin, f"--crop={config.dataset.crop_fraction}",
                        f"--size={config.image_size}", "--format=png")
    pack(pairs_file, root, insightface_bin, f"--crop={config.dataset.crop_fraction}",
         "--size=112", "--format=jpeg", "--quality=95")

    start = time.perf_counter()
    figures = evaluate_bins(workdir, [protocol_bin, insightface_bin], out_dir)
    bin_seconds = time.perf_counter() - start

    # The LFW protocol's own scoring of the same pairs, and each route's scores under both rules.
    pairs = read_lfw_pairs(pairs_file)[0]
    same = np.array([p.same for p in pairs])
    start = time.perf_counter()
    protocol_scores = lfw.score_pairs(workdir, pairs, root)
    accuracies, _, spread = lfw.fold_accuracies([protocol_scores], [same])
    protocol_seconds = time.perf_counter() - start
    restored = restore(config, workdir, len(workdir_files.read_identities(workdir)))
    embed, batch_size = bin_sets.restored_embed(restored, config.eval.batch_size)
    bin_set = read_bin(protocol_bin)
    embeddings = bin_sets.embed_bin(embed, bin_set, batch_size=batch_size, flip=config.eval.flip,
                                    image_size=config.image_size)
    bin_scores = np.sum(embeddings[0::2] * embeddings[1::2], axis=-1)

    def grid_rule(scores: np.ndarray) -> float:
        return bin_sets.insightface_accuracy(2.0 - 2.0 * scores, same, 10)[0]

    def exact_rule(scores: np.ndarray) -> float:
        return metrics.kfold_accuracy(scores, same, 10).mean

    result = {
        "workdir": workdir, "model": config.model.name, "image_size": config.image_size,
        "crop_fraction": config.dataset.crop_fraction, "pairs": len(pairs),
        "train_seconds": train_seconds, "pack_seconds": pack_seconds,
        "evaluate_bin_seconds": bin_seconds, "protocol_scoring_seconds": protocol_seconds,
        "protocol": {"accuracy": accuracies[0], "accuracy_std": spread,
                     "auc": metrics.roc_auc(protocol_scores, same),
                     "eer": metrics.eer(protocol_scores, same),
                     "tar@far=1e-3": metrics.tar_at_far(protocol_scores, same, 1e-3)},
        "bin": {k: figures[f"bin/lfw/{k}"] for k in bin_sets.METRICS},
        "bin_insightface_pack": {k: figures[f"bin/lfw_jpeg112/{k}"] for k in bin_sets.METRICS},
        "max_abs_score_difference": float(np.max(np.abs(bin_scores - protocol_scores))),
        "exact_rule": {"protocol_scores": exact_rule(protocol_scores),
                       "bin_scores": exact_rule(bin_scores)},
        "grid_rule": {"protocol_scores": grid_rule(protocol_scores),
                      "bin_scores": grid_rule(bin_scores)},
    }
    rows = [("LFW protocol", result["protocol"]), ("evaluate --bin lfw.bin", result["bin"]),
            ("evaluate --bin (insightface pack)", result["bin_insightface_pack"])]
    print("| route | accuracy | accuracy_std | auc | eer | tar@far=1e-3 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in bin_sets.METRICS) + " |")
    print(f"max |score difference|, protocol vs .bin: {result['max_abs_score_difference']:.2e}")
    print(f"exact-threshold rule on consecutive blocks: protocol scores "
          f"{result['exact_rule']['protocol_scores']:.4f}, "
          f".bin scores {result['exact_rule']['bin_scores']:.4f}")
    print(f"insightface grid rule: protocol scores {result['grid_rule']['protocol_scores']:.4f}, "
          f".bin scores {result['grid_rule']['bin_scores']:.4f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
