"""Our jitted train step against the same network in PyTorch, and its model FLOPs utilisation.

python benchmarks/train_step.py [--models resnet_tiny,iresnet18,mobilefacenet] [--steps 5]
    [--warmup 1] [--batch resnet_tiny=128,iresnet18=16,mobilefacenet=16] [--quick]

For each backbone: jfacerec's real train step (`jfacerec.training`: build_model, make_optimizer,
init_state, make_train_step, jitted with the state donated as `train` does) on its config
(configs/demo.py for resnet_tiny, configs/zoo.py for the others), against an nn.Module written
here with the same layers, widths, norms, classifier, loss (softmax cross-entropy, same label
smoothing) and optimizer (SGD, same momentum, Nesterov and weight decay on kernels only), in
PyTorch's default NCHW layout and in channels_last. Ours runs as `train` compiles it, and
without each of the two CPU changes that made it faster (the backbones' convs computed by
layers.conv_general_dilated; parallel.compiler_options), to show what each buys. Steps of all
of them alternate on one fixed batch, so load from other processes hits each alike; figures are
medians over the steps after warm-up.

MFU: the model's FLOPs per image for the whole step (forward, backward and update; about 3x the
forward), from XLA's cost analysis, times images/s, over the peak FLOP/s of a 4096^3 float32
matmul measured in the same run.

On a GPU (JAX and torch both see one) it compares bfloat16: ours with config.dtype="bfloat16",
torch with channels_last, bf16 autocast and torch.compile.

Last line: JSON with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Iterator

# On a GPU both frameworks share the device: JAX would otherwise take 75% of its memory up front
# and leave torch the rest. Set before JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import demo, zoo  # noqa: E402
from jfacerec import parallel, training  # noqa: E402
from jfacerec.models import layers  # noqa: E402
from jfacerec.objectives import Objective  # noqa: E402

MODELS = ("resnet_tiny", "iresnet18", "mobilefacenet")
# Per-step batch on the 2-core CPU: the demo's 128 for its 32-pixel backbone, less for the
# 112-pixel face backbones so that a step takes seconds, not minutes (MobileFaceNet's grouped
# convs take minutes per step of 64 in the unchanged step).
CPU_BATCH = {"resnet_tiny": 128, "iresnet18": 16, "mobilefacenet": 16}
GPU_BATCH = {"resnet_tiny": 512, "iresnet18": 256, "mobilefacenet": 512}
# Ours as training.train compiles it; without parallel.compiler_options (XLA's default CPU
# options); and without those nor layers.conv_general_dilated (every conv lax's: the code before
# the performance work).
VARIANTS = ("ours", "default_xla_options", "lax_convs_default_xla_options")
# A variant stops being timed once it has a timed step and has run this many seconds (warm-up
# included), so that a pathologically slow one (MobileFaceNet with lax's grouped convs: minutes a
# step) does not hold the run.
VARIANT_BUDGET_S = 120.0


# ---- the PyTorch peers ---------------------------------------------------------------------------

def torch_norm(kind: str, channels: int, groups: int) -> nn.Module:
    """jfacerec.models.layers.Norm for NCHW tensors (flax momentum 0.9 = torch momentum 0.1)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    n = {"group": layers._divisor_at_most(channels, groups), "layer": 1,
         "instance": channels}[kind]
    return nn.GroupNorm(n, channels, eps=1e-5)


def embedding_norm(kind: str, dim: int) -> nn.Module:
    """jfacerec.models.iresnet.embedding_norm: BatchNorm1d for "batch", else LayerNorm."""
    return nn.BatchNorm1d(dim, eps=1e-5, momentum=0.1) if kind == "batch" else nn.LayerNorm(dim)


def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free k x k conv padded by k // 2 (flax "SAME" at stride 1; at stride 2 flax pads
    (0, 1) and torch (1, 1): the same output size and work, shifted by a pixel)."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """jfacerec.models.resnet.BasicBlock: conv3x3-norm-relu-conv3x3-norm + shortcut, relu."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1, self.norm1 = conv(cin, cout, 3, stride), norm(cout)
        self.conv2, self.norm2 = conv(cout, cout, 3), norm(cout)
        self.proj = (None if cin == cout and stride == 1 else
                     nn.Sequential(conv(cin, cout, 1, stride), norm(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu((x if self.proj is None else self.proj(x)) + y)


class ResNetTiny(nn.Module):
    """jfacerec's `resnet_tiny`: a stride-2 3x3 stem, four one-block stages, mean-pool, a linear
    embedding (EmbeddingHead) and a linear classifier. [batch, 3, H, W] -> [batch, classes]."""

    def __init__(self, widths: list[int], embedding_dim: int, classes: int, norm_kind: str,
                 groups: int):
        super().__init__()
        norm = lambda c: torch_norm(norm_kind, c, groups)  # noqa: E731
        self.stem, self.stem_norm = conv(3, widths[0], 3, 2), norm(widths[0])
        cins = [widths[0], *widths[:-1]]
        self.blocks = nn.Sequential(*[BasicBlock(cin, w, 1 if i == 0 else 2, norm)
                                      for i, (cin, w) in enumerate(zip(cins, widths))])
        self.proj = nn.Linear(widths[-1], embedding_dim)
        self.classifier = nn.Linear(embedding_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem_norm(self.stem(x))))
        return self.classifier(self.proj(x.mean((2, 3))))


class IBasicBlock(nn.Module):
    """jfacerec.models.iresnet.IBasicBlock: norm-conv3x3-norm-PReLU-conv3x3(stride)-norm +
    (projected) shortcut, no activation after the sum."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.bn1, self.conv1, self.bn2 = norm(cin), conv(cin, cout, 3), norm(cout)
        self.prelu = nn.PReLU(cout, 0.25)
        self.conv2, self.bn3 = conv(cout, cout, 3, stride), norm(cout)
        self.downsample = (None if cin == cout and stride == 1 else
                           nn.Sequential(conv(cin, cout, 1, stride), norm(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.bn1(x))
        y = self.bn3(self.conv2(self.prelu(self.bn2(y))))
        return (x if self.downsample is None else self.downsample(x)) + y


class IResNet(nn.Module):
    """jfacerec's iresnet: 3x3 stem, stages whose first block has stride 2, norm, flatten, fc,
    embedding norm, linear classifier. [batch, 3, 112, 112] -> [batch, classes]."""

    def __init__(self, stage_sizes: list[int], widths: list[int], embedding_dim: int,
                 classes: int, image_size: int, norm_kind: str, groups: int):
        super().__init__()
        norm = lambda c: torch_norm(norm_kind, c, groups)  # noqa: E731
        self.conv1, self.bn1 = conv(3, widths[0], 3), norm(widths[0])
        self.prelu = nn.PReLU(widths[0], 0.25)
        blocks, cin = [], widths[0]
        for size, width in zip(stage_sizes, widths):
            for j in range(size):
                blocks.append(IBasicBlock(cin, width, 2 if j == 0 else 1, norm))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn2 = norm(cin)
        side = image_size // 2 ** len(widths)
        self.fc = nn.Linear(cin * side * side, embedding_dim)
        self.features = embedding_norm(norm_kind, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.prelu(self.bn1(self.conv1(x))))
        x = self.bn2(x).flatten(1)
        return self.classifier(self.features(self.fc(x)))


class ConvNorm(nn.Sequential):
    """jfacerec.models.mobilenet.ConvNorm: (grouped) conv, norm, PReLU unless `act` is False."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int,
                 norm: Callable[[int], nn.Module], act: bool = True):
        layers = [conv(cin, cout, kernel, stride, groups), norm(cout)]
        super().__init__(*layers, *([nn.PReLU(cout, 0.25)] if act else []))


class DepthWise(nn.Module):
    """jfacerec.models.mobilenet.DepthWise: 1x1 expand, 3x3 depthwise, 1x1 linear (+ input)."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int, residual: bool,
                 norm: Callable[[int], nn.Module]):
        super().__init__()
        self.residual = residual
        self.body = nn.Sequential(ConvNorm(cin, groups, 1, 1, 1, norm),
                                  ConvNorm(groups, groups, 3, stride, groups, norm),
                                  ConvNorm(groups, cout, 1, 1, 1, norm, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(nn.Module):
    """jfacerec's mobilefacenet (arcface_torch `mbf`): depthwise blocks, a 7x7 global depthwise
    conv, norm, fc, embedding norm, classifier. [batch, 3, 112, 112] -> [batch, classes]."""

    def __init__(self, blocks: list[int], embedding_dim: int, classes: int, image_size: int,
                 norm_kind: str, groups: int):
        super().__init__()
        norm = lambda c: torch_norm(norm_kind, c, groups)  # noqa: E731
        layers = [ConvNorm(3, 128, 3, 2, 1, norm), ConvNorm(128, 128, 3, 1, 64, norm)]
        cin = 128
        for out, n, expand, down in [(128, blocks[1], 128, 128), (256, blocks[2], 256, 256),
                                     (256, blocks[3], 256, 512)]:
            layers.append(DepthWise(cin, out, down, 2, False, norm))
            layers += [DepthWise(out, out, expand, 1, True, norm) for _ in range(n)]
            cin = out
        layers.append(ConvNorm(cin, 512, 1, 1, 1, norm))
        side = image_size // 16
        layers += [nn.Conv2d(512, 512, side, groups=512, bias=False), norm(512)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(512, embedding_dim, bias=False)
        self.features = embedding_norm(norm_kind, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.fc(self.body(x).flatten(1))))


def torch_model(config, classes: int) -> nn.Module:
    m = config.model
    if m.width_multiplier != 1.0 or m.dropout or m.get("dropblock", 0.0):
        raise ValueError("the torch peers are written for width 1 without dropout or DropBlock")
    if m.name == "resnet_tiny":
        return ResNetTiny([24, 48, 96, 192], m.embedding_dim, classes, m.norm, m.norm_groups)
    if m.name == "iresnet18":
        return IResNet([2, 2, 2, 2], [64, 128, 256, 512], m.embedding_dim, classes,
                       config.image_size, m.norm, m.norm_groups)
    if m.name == "mobilefacenet":
        return MobileFaceNet([1, 4, 6, 2], m.embedding_dim, classes, config.image_size, m.norm,
                             m.norm_groups)
    raise ValueError(f"no torch peer for {m.name!r}; choose from {MODELS}")


def torch_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """training.make_optimizer's SGD: weight decay added to the gradient of kernels (ndim > 1)
    only, then Nesterov momentum. The learning rate is held constant (its value costs nothing)."""
    o = config.optimizer
    if o.name != "sgd" or o.grad_clip_norm:
        raise ValueError("the torch peer mirrors SGD without gradient clipping")
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=o.learning_rate, momentum=o.momentum, nesterov=o.nesterov)


# ---- configs and the steps -----------------------------------------------------------------------

def get_config(name: str, batch: int, dtype: str):
    """The backbone's config (the demo's for resnet_tiny, the zoo's for the others)."""
    config = demo.get_config() if name == "resnet_tiny" else zoo.get_config(name)
    config.batch_size = batch
    config.dtype = dtype
    config.num_devices = 1
    if config.loss.name != "softmax":
        raise ValueError("the torch peer mirrors the softmax loss")
    return config


@contextlib.contextmanager
def lax_convs(enabled: bool) -> Iterator[None]:
    """While enabled, the backbones' convs (layers.conv2d) compute with lax.conv_general_dilated,
    as they did before layers.conv_general_dilated."""
    original = layers.conv_general_dilated
    if enabled:
        layers.conv_general_dilated = jax.lax.conv_general_dilated
    try:
        yield
    finally:
        layers.conv_general_dilated = original


def jax_step(config, classes: int, variant: str) -> tuple[Callable[[], None], dict]:
    """(run one step and wait for it, facts: FLOPs of a step, parameter count and shapes).

    variant: one of VARIANTS; "ours" is training.train's jit (state donated, its options).
    """
    model = training.build_model(config, classes)
    tx = training.make_optimizer(config)
    size, batch = config.image_size, config.batch_size
    data = {"image": jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
            "label": jax.random.randint(jax.random.key(2), (batch,), 0, classes)}
    with lax_convs(variant.startswith("lax_convs")):
        state = training.init_state(model, tx, size, jax.random.key(0),
                                    Objective.from_config(config))
        # As training.train jits it: the old state's buffers are reused for the new one.
        lowered = jax.jit(training.make_train_step(model, tx, config),
                          donate_argnums=0).lower(state, data)
    options = None if variant.endswith("default_xla_options") else parallel.compiler_options()
    compiled = lowered.compile(compiler_options=options)
    cost = compiled.cost_analysis()
    facts = {
        # The model's FLOPs: XLA's count on the step as written. The compiled count also holds
        # XLA:CPU's rewrites (grouped convs expanded into dense ones: twice MobileFaceNet's).
        "flops": float(lowered.cost_analysis()["flops"]),
        "compiled_flops": float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]),
        "parameters": sum(int(p.size) for p in jax.tree.leaves(state.params)),
        "param_shapes": jax.tree.map(lambda p: p.shape, state.params),
    }
    holder = [state]

    def run() -> None:
        holder[0], metrics = compiled(holder[0], data)
        jax.block_until_ready((holder[0], metrics))

    return run, facts


def torch_step(config, classes: int, channels_last: bool, gpu: bool
               ) -> tuple[Callable[[], None], int]:
    """(run one step and wait for it, parameter count)."""
    torch.manual_seed(0)
    device = "cuda" if gpu else "cpu"
    model = torch_model(config, classes).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch_optimizer(model, config)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    batch, size = config.batch_size, config.image_size
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    labels = torch.randint(0, classes, (batch,), device=device)
    smoothing = config.loss.label_smoothing
    forward = torch.compile(model) if gpu else model

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=gpu):
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        loss.backward()
        opt.step()
        if gpu:
            torch.cuda.synchronize()

    return run, params


def peak_flops(dtype: str, size: int, repeats: int = 5) -> float:
    """Median FLOP/s of a [size, size] @ [size, size] matmul in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = [seconds(lambda: dot(a, b).block_until_ready()) for _ in range(repeats)]
    return 2 * size ** 3 / float(np.median(times))


def interleave(runs: dict[str, Callable[[], None]], steps: int, warmup: int,
               budget_s: float = float("inf")) -> dict[str, list[float]]:
    """Seconds of each run's timed steps, the runs' steps taken in turn so that load from other
    processes falls on all of them alike. A run is not stepped again once it has a timed step
    and has spent budget_s."""
    times = {k: [] for k in runs}
    spent = dict.fromkeys(runs, 0.0)
    for i in range(warmup + steps):
        for key, run in runs.items():
            if times[key] and spent[key] > budget_s:
                continue
            t = seconds(run)
            spent[key] += t
            # A step longer than the whole budget is its own sample, warm-up or not (XLA has
            # compiled already; the first run's extra cost is small against minutes).
            if i >= warmup or t > budget_s:
                times[key].append(t)
    return times


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, batch: int, steps: int, warmup: int, gpu: bool) -> dict:
    """Our variants and torch's layouts, steps interleaved; medians, ratios, FLOPs."""
    config = get_config(name, batch, "bfloat16" if gpu else "float32")
    classes = config.dataset.num_identities
    runs, facts = {}, {}
    # On the GPU only ours runs (the tap convs and the options are CPU-only: off there by
    # themselves), and torch gets its best set-up directly.
    for variant in ("ours",) if gpu else VARIANTS:
        runs[f"jax_{variant}"], facts[variant] = jax_step(config, classes, variant)
        assert facts[variant]["param_shapes"] == facts["ours"]["param_shapes"], variant
    jax_params = facts["ours"]["parameters"]
    for layout in ("channels_last",) if gpu else ("contiguous", "channels_last"):
        runs[f"torch_{layout}"], torch_params = torch_step(config, classes,
                                                           layout == "channels_last", gpu)
    print(f"{name}: parameters jax {jax_params:,}, torch {torch_params:,}", flush=True)
    assert torch_params == jax_params, (name, jax_params, torch_params)

    times = interleave(runs, steps, warmup, VARIANT_BUDGET_S)
    rates = {k: batch / float(np.median(v)) for k, v in times.items()}
    torch_best = max((k for k in rates if k.startswith("torch_")), key=rates.get)
    # Model FLOPs from lax's convs: the tap convs' elementwise multiply-adds count alike, but the
    # model is the same whichever way a conv is computed.
    model_facts = facts.get("lax_convs_default_xla_options", facts["ours"])
    flops = model_facts["flops"] / batch
    result = {"batch": batch, "image_size": config.image_size, "dtype": config.dtype,
              "parameters": jax_params, "flops_per_image": flops,
              "compiled_flops_per_image": {v: f["compiled_flops"] / batch
                                           for v, f in facts.items()},
              **{f"{k}_images_per_s": v for k, v in rates.items()},
              "torch_best": torch_best.removeprefix("torch_"),
              **{f"ratio_{k}_to_torch_best": rates[k] / rates[torch_best]
                 for k in rates if k.startswith("jax_")},
              "step_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()}}
    print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " img/s",
          flush=True)
    return result


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model_name = next((line.split(":", 1)[1].strip() for line in lscpu
                       if line.startswith("Model name")), platform.processor())
    return {"cpu_count": os.cpu_count(), "cpu_model": model_name,
            "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": str(jax.devices()[0]),
            "date": datetime.date.today().isoformat()}


def parse_batches(text: str, defaults: dict[str, int]) -> dict[str, int]:
    """"iresnet18=16,mobilefacenet=32", or one number for every model -> {model: batch}."""
    if text and "=" not in text:
        return {k: int(text) for k in defaults}
    batches = dict(defaults)
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        batches[key] = int(value)
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", default="", help="one number, or model=batch,...")
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 warm-up, batches / 4")
    args = parser.parse_args()

    gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    # Torch's intra-op threads = the cores, as XLA's CPU thread pool.
    torch.set_num_threads(os.cpu_count())
    defaults = GPU_BATCH if gpu else CPU_BATCH
    if args.quick:
        args.steps, args.warmup = 2, 1
        defaults = {k: max(4, v // 4) for k, v in defaults.items()}
    batches = parse_batches(args.batch, defaults)
    dtype = "bfloat16" if gpu else "float32"
    size = 8192 if gpu else 4096
    load_before = os.getloadavg()[0]
    peak = peak_flops(dtype, size)
    print(f"peak matmul {peak / 1e9:.1f} GFLOP/s ({dtype})", flush=True)

    results = {}
    for name in args.models.split(","):
        r = compare(name, batches[name], args.steps, args.warmup, gpu)
        for k in [k for k in r if k.startswith("jax_") and k.endswith("_images_per_s")]:
            r[k.replace("_images_per_s", "_mfu")] = r["flops_per_image"] * r[k] / peak
        results[name] = r
    # Measured again: the drift between the two readings shows how the machine's load changed.
    peak_after = peak_flops(dtype, size)

    variants = [k.removesuffix("_images_per_s") for k in next(iter(results.values()))
                if k.startswith("jax_") and k.endswith("_images_per_s")]
    print()
    print("| model | batch | torch img/s (NCHW / channels_last) | "
          + " | ".join(f"{v} img/s (x torch best)" for v in variants)
          + " | train-step GFLOP/image | MFU " + " / ".join(variants) + " |")
    print("| --- " * (4 + len(variants)) + "| --- |")
    for name, r in results.items():
        peers = " / ".join(f"{r[k]:.1f}" for k in ("torch_contiguous_images_per_s",
                                                     "torch_channels_last_images_per_s") if k in r)
        ours = " | ".join(f"{r[f'{v}_images_per_s']:.1f} ({r[f'ratio_{v}_to_torch_best']:.2f}x)"
                          for v in variants)
        mfu = " / ".join(f"{100 * r[f'{v}_mfu']:.1f}%" for v in variants)
        print(f"| {name} ({r['image_size']} px) | {r['batch']} | {peers} | {ours} | "
              f"{r['flops_per_image'] / 1e9:.3f} | {mfu} |")
    print(f"\npeak {peak / 1e9:.1f} GFLOP/s before, {peak_after / 1e9:.1f} after; torch threads "
          f"{torch.get_num_threads()}; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(json.dumps({"peak_flops": peak, "peak_flops_after": peak_after, "steps": args.steps,
                      "warmup": args.warmup, "xla_options": parallel.compiler_options(),
                      "load_average": [load_before, os.getloadavg()[0]], "machine": machine(),
                      "results": results}))


if __name__ == "__main__":
    main()
