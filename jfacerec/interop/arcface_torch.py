"""arcface_torch's backbones, layer by layer, against jfacerec's: names, order and weight layouts.

insightface's recognition/arcface_torch defines IResNet (iresnet18/34/50/100) and MobileFaceNet
(`mbf`); jfacerec's models/iresnet.py and models/mobilenet.py compute the same functions (same
paddings, strides, BatchNorm eps 1e-5, per-channel PReLU). `layers(name)` lists a backbone's
weighted layers in forward order, each with its state-dict prefix and its module path in our
parameter tree; `to_variables` turns their weights, in PyTorch's layouts, into the backbone's
{"params", "batch_stats"}. Both importers (a .pth state dict, an ONNX graph) go
through it.

Layouts: conv kernels OIHW -> HWIO (grouped and depthwise alike: [O, I/groups, H, W] ->
[H, W, I/groups, O]); Linear [out, in] -> Dense [in, out], the rows of IResNet's `fc` reordered
from PyTorch's flattening of [C, H, W] to ours of [H, W, C]; BatchNorm weight, bias ->
scale, bias and running_mean, running_var -> batch_stats mean, var; PReLU weight [C] -> alpha.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

# The weighted layers of arcface_torch: the tensors each kind has in a state dict.
TENSORS = {
    "conv": ("weight",),
    "bn": ("weight", "bias", "running_mean", "running_var"),
    "prelu": ("weight",),
    "linear": ("weight",),
}
# Kept by torch in a BatchNorm's state dict, needed by no forward pass.
IGNORED = ("num_batches_tracked",)

IRESNET_BLOCKS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3),
                  "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}
SUPPORTED = tuple(IRESNET_BLOCKS) + ("mobilefacenet",)
BN_EPS = 1e-5  # arcface_torch's BatchNorm eps, and ours


@dataclasses.dataclass(frozen=True)
class Layer:
    """One weighted layer: its kind, its state-dict prefix and its module path under our
    params["backbone"]. `bias`: a linear layer with a bias; `flat_channels`: the channels of the
    map a linear layer's input flattens (its rows are reordered from [C, H, W] to [H, W, C])."""

    kind: str
    torch: str
    ours: tuple[str, ...]
    bias: bool = False
    flat_channels: int = 0

    def keys(self) -> tuple[str, ...]:
        """The layer's state-dict keys (without those in IGNORED)."""
        names = TENSORS[self.kind] + (("bias",) if self.bias else ())
        return tuple(f"{self.torch}.{name}" for name in names)


def _bn(torch: str, *ours: str) -> Layer:
    """A BatchNorm2d: our `Norm` module holds flax's BatchNorm under the name BatchNorm_0."""
    return Layer("bn", torch, (*ours, "BatchNorm_0"))


def _iresnet(blocks: Sequence[int]) -> list[Layer]:
    out = [Layer("conv", "conv1", ("conv1",)), _bn("bn1", "bn1"), Layer("prelu", "prelu",
                                                                          ("prelu",))]
    for i, n in enumerate(blocks):
        for j in range(n):
            p, o = f"layer{i + 1}.{j}", f"layer{i + 1}_{j}"
            out += [_bn(f"{p}.bn1", o, "bn1"), Layer("conv", f"{p}.conv1", (o, "conv1")),
                    _bn(f"{p}.bn2", o, "bn2"), Layer("prelu", f"{p}.prelu", (o, "prelu")),
                    Layer("conv", f"{p}.conv2", (o, "conv2")), _bn(f"{p}.bn3", o, "bn3")]
            if j == 0:  # every stage starts at stride 2: a projected shortcut
                out += [Layer("conv", f"{p}.downsample.0", (o, "downsample")),
                        _bn(f"{p}.downsample.1", o, "downsample_bn")]
    return out + [_bn("bn2", "bn2"),
                  Layer("linear", "fc", ("fc",), bias=True, flat_channels=512),
                  Layer("bn", "features", ("features",))]


def _conv_block(torch: str, *ours: str, act: bool = True) -> list[Layer]:
    """arcface_torch's ConvBlock (conv, BN, PReLU) or LinearBlock (act=False): our ConvNorm."""
    out = [Layer("conv", f"{torch}.layers.0", (*ours, "Conv_0")),
           _bn(f"{torch}.layers.1", *ours, "Norm_0")]
    return out + [Layer("prelu", f"{torch}.layers.2", (*ours, "PReLU_0"))] if act else out


def _depthwise(torch: str, ours: str) -> list[Layer]:
    return (_conv_block(f"{torch}.layers.0", ours, "ConvNorm_0")
            + _conv_block(f"{torch}.layers.1", ours, "ConvNorm_1")
            + _conv_block(f"{torch}.layers.2", ours, "ConvNorm_2", act=False))


def _mobilefacenet(blocks: Sequence[int] = (4, 6, 2)) -> list[Layer]:
    out = _conv_block("layers.0", "ConvNorm_0") + _conv_block("layers.1", "ConvNorm_1")
    k = 0  # our DepthWise modules are numbered through the stages
    for stage, n in enumerate(blocks):
        down, residual = 2 + 2 * stage, 3 + 2 * stage  # arcface_torch's `layers` indices
        out += _depthwise(f"layers.{down}", f"DepthWise_{k}")
        out += [layer for i in range(n)
                for layer in _depthwise(f"layers.{residual}.layers.{i}", f"DepthWise_{k + 1 + i}")]
        k += 1 + n
    return out + _conv_block("conv_sep", "ConvNorm_2") + [
        Layer("conv", "features.layers.0.layers.0", ("gdc",)),
        Layer("bn", "features.layers.0.layers.1", ("gdc_norm", "BatchNorm_0")),
        Layer("linear", "features.layers.2", ("fc",)),
        Layer("bn", "features.layers.3", ("features",))]


def layers(model: str) -> list[Layer]:
    """The weighted layers of arcface_torch's backbone `model`, in forward order."""
    if model in IRESNET_BLOCKS:
        return _iresnet(IRESNET_BLOCKS[model])
    if model == "mobilefacenet":
        return _mobilefacenet()
    raise ValueError(f"--model {model}: no arcface_torch backbone of that name; choose one of "
                     f"{', '.join(SUPPORTED)}")


def shortened(names: Sequence[str], limit: int = 8) -> str:
    """At most `limit` names, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def split_state_dict(state_dict: Mapping[str, np.ndarray], model: str,
                     source: str) -> list[dict[str, np.ndarray]]:
    """The state dict's tensors of each of `layers(model)`, by tensor name ("weight", ...).

    Raises ValueError naming `source` and listing every missing and every unexpected key (a
    state dict of another backbone, or not of arcface_torch).
    """
    spec = layers(model)
    expected = [key for layer in spec for key in layer.keys()]
    known = set(expected)
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict
                  if key not in known and key.rsplit(".", 1)[-1] not in IGNORED]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing keys ({shortened(missing)})"] if missing else []) + (
            [f"{len(unexpected)} unexpected keys ({shortened(unexpected)})"] if unexpected else [])
        raise ValueError(f"{source}: not arcface_torch's {model}: {'; '.join(parts)}; pass the "
                         f"--model the file was trained as (one of {', '.join(SUPPORTED)})")
    return [{key.rsplit(".", 1)[-1]: np.asarray(state_dict[key]) for key in layer.keys()}
            for layer in spec]


def _linear_kernel(weight: np.ndarray, flat_channels: int) -> np.ndarray:
    """Linear weight [out, in] -> Dense kernel [in, out]; with `flat_channels` C, the input is a
    flattened [C, H, W] map (PyTorch) whose rows are reordered to [H, W, C] (ours)."""
    if weight.ndim != 2:
        return weight  # of the wrong shape: the caller's shape check names it
    out_features, in_features = weight.shape
    side = math.isqrt(in_features // flat_channels) if flat_channels else 0
    if not flat_channels or side * side * flat_channels != in_features:
        return weight.T
    chw = weight.reshape(out_features, flat_channels, side, side)
    return chw.transpose(2, 3, 1, 0).reshape(in_features, out_features)


def _set(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def to_variables(spec: Sequence[Layer],
                 weights: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """The backbone's {"params", "batch_stats"} (our params["backbone"] and
    batch_stats["backbone"]) in float32, from each layer's
    tensors in PyTorch's layouts (see the module docstring). A tensor of the wrong rank is kept as
    it is, for the caller's shape check to name."""
    params: dict = {}
    stats: dict = {}
    for layer, w in zip(spec, weights, strict=True):
        w = {name: np.asarray(value, np.float32) for name, value in w.items()}
        if layer.kind == "conv":
            kernel = w["weight"]
            _set(params, (*layer.ours, "kernel"),
                 kernel.transpose(2, 3, 1, 0) if kernel.ndim == 4 else kernel)
        elif layer.kind == "bn":
            _set(params, (*layer.ours, "scale"), w["weight"])
            _set(params, (*layer.ours, "bias"), w["bias"])
            _set(stats, (*layer.ours, "mean"), w["running_mean"])
            _set(stats, (*layer.ours, "var"), w["running_var"])
        elif layer.kind == "prelu":
            _set(params, (*layer.ours, "alpha"), w["weight"].reshape(-1))
        else:
            _set(params, (*layer.ours, "kernel"), _linear_kernel(w["weight"], layer.flat_channels))
            if layer.bias:
                _set(params, (*layer.ours, "bias"), w["bias"])
    return {"params": params, "batch_stats": stats}
