"""The configs: Python files that return an ml_collections ConfigDict, run by path.

    python -m jfacerec.train --config configs/NAME.py[:ARG] --workdir W [--config.KEY=VALUE ...]

- Every config starts from the base config, `jfacerec.core.config_base.base_config()`: every key
  with its one default (the demo's values). A config changes only what its recipe changes, so
  `--config.KEY=VALUE` can set any key on any config; the `dataset` block holds the keys of every
  source, so e.g. `--config.dataset.name=folder --config.dataset.root=DIR` works on any config.
- ARG is comma-separated tokens, one form everywhere (`config_base.parse_arg`): a config's choice
  where it has choices (zoo.py's backbone, demo_losses.py's objective, hw2p2_*.py's `softmax`) and
  `runlocal` (a CPU smoke-test size) on every config: `configs/zoo.py:mobilefacenet,runlocal`.
  An unknown token is an error naming it and the tokens the config takes.
- How the files find each other, from any working directory: absl's config_flags loads a config
  file by path (importlib, under a module name of its own), so `import configs.x` inside a config
  works only when the repository root happens to be on the module search path (commands run from
  the root), not from another directory. The configs therefore import only the installed package
  (`from jfacerec.core import config_base`), and a config built on another loads that file by
  path too: `zoo = config_base.sibling(__file__, "zoo")`. Nothing changes the search path. Tests
  and scripts load a config with `config_base.load("configs/NAME.py[:ARG]")`, as `--config` does.

This file only makes configs/ a package (`import configs.demo` from the repository root).

demo.py           the base config plus its smoke-test size: a small ResNet, synthetic identities
demo_losses.py    the demo with another objective, one per argument (`demo_losses.py:arcface`)
zoo.py            any registered backbone at its native input size (`zoo.py:iresnet50`)
lfw.py orl.py     public-dataset protocols (jfacerec.evaluation.lfw, .orl)
tfds_lfw.py       LFW read through TensorFlow Datasets
hw2p2_iresnet50.py hw2p2_mobilefacenet.py   the course's data (argument `softmax`)
tpu_v4_32.py tpu_v5e_8.py                   full-scale TPU recipes
"""
