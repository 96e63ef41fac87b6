"""A trained jfacerec model as an ONNX graph that insightface's tools and onnxruntime run as they
run insightface's own recognition models (w600k_r50.onnx).

The graph: input `data`, float32 NCHW [batch, 3, size, size] of RGB pixels already normalised as
(x - 127.5) / 127.5 (the caller's job, as for insightface's models); output `embedding`, float32
[batch, embedding_dim], the eval-mode embedding without flip and before L2 normalisation. The batch
dimension is dynamic; the graph computes in float32 whatever the training dtype.

Why not a generic JAX exporter (jax2onnx): it converts the traced jaxpr, and jfacerec's convs run
through models/xla_cpu.py's tap-by-tap CPU path and its norms through a custom VJP, so a traced
graph would be slices and multiply-adds instead of Conv, BatchNormalization and PRelu nodes. Here
each backbone is written out from its flax module's structure and parameters: plain ONNX nodes
(opset 13, IR 7, which onnxruntime releases since 1.6 read), one per layer.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jfacerec.core import storage
from jfacerec.core import workdir as workdir_files
from jfacerec.core.atomic import atomic_open
from jfacerec.inference.restore import restore
from jfacerec.models import FaceModel
from jfacerec.models.convnext import ConvNeXt
from jfacerec.models.iresnet import IResNet
from jfacerec.models.layers import _divisor_at_most
from jfacerec.models.mobilenet import MobileFaceNet, MobileNetV2, _make_divisible
from jfacerec.models.resnet import ResNet

OPSET = 13
IR_VERSION = 7
INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
NORMALIZATION = "(x - 127.5) / 127.5 on RGB pixels, NCHW"


class _Tensor(NamedTuple):
    """A value of the graph: its name and its shape without the batch ([C, H, W] or [D])."""

    name: str
    shape: tuple[int, ...]


@dataclasses.dataclass
class _Scope:
    """A flax module's variables ({"params"}, {"batch_stats"} subtrees) and its path, which names
    its nodes and weights; `auto` gives the names flax gives unnamed submodules (Conv_0, ...)."""

    params: Mapping[str, Any]
    stats: Mapping[str, Any]
    path: str
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> _Scope:
        if name not in self.params:
            raise ValueError(f"the checkpoint has no parameters {self.path}/{name}: the exporter "
                             f"does not match this model's structure")
        return _Scope(self.params[name], self.stats.get(name, {}),
                      f"{self.path}/{name}" if self.path else name)

    def auto(self, kind: str) -> _Scope:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        return self[f"{kind}_{n}"]

    def param(self, name: str) -> np.ndarray:
        return np.asarray(self.params[name], np.float32)

    def stat(self, name: str) -> np.ndarray:
        return np.asarray(self.stats[name], np.float32)


class _Graph:
    """ONNX nodes and weights, appended in order."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self._used: set[str] = set()

    def _unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._used:
            candidate, n = f"{name}_{n}", n + 1
        self._used.add(candidate)
        return candidate

    def weight(self, name: str, array: np.ndarray, dtype: Any = np.float32) -> str:
        name = self._unique(name)
        self.weights.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        """Appends one node named `name` (made unique) and returns its output's name."""
        name = self._unique(name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name


# -- Layers: flax's arithmetic as ONNX nodes, on NCHW tensors --------------------------------------


def _pads(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
          padding: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """flax's padding ("SAME", "VALID" or explicit (low, high) pairs) as explicit pairs."""
    if isinstance(padding, str):
        return [tuple(p) for p in jax.lax.padtype_to_pads(size, kernel, strides, padding)]
    return [tuple(p) for p in padding]


def _onnx_pads(pads: Sequence[tuple[int, int]]) -> list[int]:
    """[(top, bottom), (left, right)] -> ONNX's [top, left, bottom, right]."""
    return [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]


def _spatial_out(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                 pads: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(size, kernel, strides,
                                                                            pads))


def conv(g: _Graph, s: _Scope, x: _Tensor, strides: int = 1,
         padding: str | Sequence[tuple[int, int]] = "SAME", groups: int = 1) -> _Tensor:
    """nn.Conv: kernel [kh, kw, in / groups, out] (+ bias [out]) on [C, H, W]."""
    kernel = s.param("kernel")
    kh, kw, _, out = kernel.shape
    pads = _pads(x.shape[1:], (kh, kw), (strides, strides), padding)
    inputs = [x.name, g.weight(f"{s.path}/kernel", kernel.transpose(3, 2, 0, 1))]
    if "bias" in s.params:
        inputs.append(g.weight(f"{s.path}/bias", s.param("bias")))
    name = g.op("Conv", inputs, s.path, kernel_shape=[kh, kw], strides=[strides, strides],
                pads=_onnx_pads(pads), group=groups)
    return _Tensor(name, (out, *_spatial_out(x.shape[1:], (kh, kw), (strides, strides), pads)))


def _per_channel(array: np.ndarray, x: _Tensor) -> np.ndarray:
    """[C] -> [C, 1, 1] on a map (broadcast over H and W), kept [C] on a vector."""
    return array.reshape(array.shape + (1,) * (len(x.shape) - 1))


def _affine(g: _Graph, s: _Scope, x: _Tensor, y: str) -> _Tensor:
    """y * scale + bias, per channel."""
    scale = g.weight(f"{s.path}/scale", _per_channel(s.param("scale"), x))
    bias = g.weight(f"{s.path}/bias", _per_channel(s.param("bias"), x))
    y = g.op("Mul", [y, scale], f"{s.path}/scaled")
    return _Tensor(g.op("Add", [y, bias], f"{s.path}/shifted"), x.shape)


def batch_norm(g: _Graph, s: _Scope, x: _Tensor, eps: float) -> _Tensor:
    """BatchNorm at eval ([C, H, W] or [D]): running statistics, scale and bias."""
    inputs = [x.name] + [g.weight(f"{s.path}/{k}", v) for k, v in (
        ("scale", s.param("scale")), ("bias", s.param("bias")), ("mean", s.stat("mean")),
        ("var", s.stat("var")))]
    return _Tensor(g.op("BatchNormalization", inputs, s.path, epsilon=eps), x.shape)


def _standardize(g: _Graph, x: str, axes: list[int], eps: float, path: str) -> str:
    """(x - mean) / sqrt(var + eps), the statistics over `axes` of each example, with flax's
    var = max(E[x^2] - E[x]^2, 0): a two-pass variance would differ from jfacerec's by more than
    rounding where the mean is large against the spread."""
    mean = g.op("ReduceMean", [x], f"{path}/mean", axes=axes, keepdims=1)
    square = g.op("ReduceMean", [g.op("Mul", [x, x], f"{path}/square")], f"{path}/mean_square",
                  axes=axes, keepdims=1)
    var = g.op("Relu", [g.op("Sub", [square, g.op("Mul", [mean, mean], f"{path}/mean_squared")],
                             f"{path}/difference")], f"{path}/var")
    eps = g.weight(f"{path}/eps", np.float32(eps))
    std = g.op("Sqrt", [g.op("Add", [var, eps], f"{path}/var_eps")], f"{path}/std")
    return g.op("Div", [g.op("Sub", [x, mean], f"{path}/centred"), std], f"{path}/standardized")


def group_norm(g: _Graph, s: _Scope, x: _Tensor, groups: int, eps: float) -> _Tensor:
    """GroupNorm of [C, H, W]: statistics per example over each group's channels and space."""
    flat = g.weight(f"{s.path}/groups_shape", np.array([0, groups, -1]), np.int64)
    y = g.op("Reshape", [x.name, flat], f"{s.path}/groups")
    y = _standardize(g, y, [2], eps, s.path)
    back = g.weight(f"{s.path}/map_shape", np.array([0, *x.shape]), np.int64)
    return _affine(g, s, x, g.op("Reshape", [y, back], f"{s.path}/map"))


def layer_norm(g: _Graph, s: _Scope, x: _Tensor, eps: float) -> _Tensor:
    """nn.LayerNorm over the channels ([C, H, W]: at each position) or over [D]."""
    return _affine(g, s, x, _standardize(g, x.name, [1], eps, s.path))


def norm(g: _Graph, s: _Scope, x: _Tensor, kind: str, groups: int, eps: float = 1e-5) -> _Tensor:
    """models.norms.Norm of `kind`: BatchNorm_0, or GroupNorm_0 with its group count."""
    if kind == "batch":
        return batch_norm(g, s["BatchNorm_0"], x, eps)
    channels = x.shape[0]
    count = {"group": _divisor_at_most(channels, groups), "layer": 1,
             "instance": channels}.get(kind)
    if count is None:
        raise ValueError(f"cannot export norm {kind!r}: the exporter knows batch, group, layer "
                         f"and instance")
    return group_norm(g, s["GroupNorm_0"], x, count, eps)


def prelu(g: _Graph, s: _Scope, x: _Tensor) -> _Tensor:
    slope = g.weight(f"{s.path}/alpha", _per_channel(s.param("alpha"), x))
    return _Tensor(g.op("PRelu", [x.name, slope], s.path), x.shape)


def relu(g: _Graph, x: _Tensor, path: str) -> _Tensor:
    return _Tensor(g.op("Relu", [x.name], f"{path}/relu"), x.shape)


def relu6(g: _Graph, x: _Tensor, path: str) -> _Tensor:
    low = g.weight(f"{path}/zero", np.float32(0.0))
    high = g.weight(f"{path}/six", np.float32(6.0))
    return _Tensor(g.op("Clip", [x.name, low, high], f"{path}/relu6"), x.shape)


def gelu(g: _Graph, x: _Tensor, path: str) -> _Tensor:
    """nn.gelu's default, the tanh approximation: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = lambda name, v: g.weight(f"{path}/{name}", np.float32(v))  # noqa: E731
    cube = g.op("Mul", [x.name, g.op("Mul", [x.name, x.name], f"{path}/x2")], f"{path}/x3")
    inner = g.op("Add", [x.name, g.op("Mul", [cube, c("k", 0.044715)], f"{path}/kx3")],
                 f"{path}/inner")
    t = g.op("Tanh", [g.op("Mul", [inner, c("a", math.sqrt(2 / math.pi))], f"{path}/arg")],
             f"{path}/tanh")
    half = g.op("Mul", [x.name, c("half", 0.5)], f"{path}/half_x")
    return _Tensor(g.op("Mul", [half, g.op("Add", [t, c("one", 1.0)], f"{path}/one_plus")],
                        f"{path}/gelu"), x.shape)


def add(g: _Graph, a: _Tensor, b: _Tensor, path: str) -> _Tensor:
    return _Tensor(g.op("Add", [a.name, b.name], f"{path}/add"), a.shape)


def dense(g: _Graph, s: _Scope, x: _Tensor) -> _Tensor:
    """nn.Dense on [D]: kernel [D, out] (+ bias)."""
    kernel = s.param("kernel")
    inputs = [x.name, g.weight(f"{s.path}/kernel", kernel)]
    if "bias" in s.params:
        inputs.append(g.weight(f"{s.path}/bias", s.param("bias")))
    return _Tensor(g.op("Gemm", inputs, s.path), (kernel.shape[1],))


def dense_on_map(g: _Graph, s: _Scope, x: _Tensor) -> _Tensor:
    """nn.Dense over the channels of [C, H, W] at each position: a 1x1 conv."""
    kernel = s.param("kernel")
    inputs = [x.name, g.weight(f"{s.path}/kernel", kernel.T[:, :, None, None])]
    if "bias" in s.params:
        inputs.append(g.weight(f"{s.path}/bias", s.param("bias")))
    return _Tensor(g.op("Conv", inputs, s.path, kernel_shape=[1, 1]),
                   (kernel.shape[1], *x.shape[1:]))


def flatten_dense(g: _Graph, s: _Scope, x: _Tensor) -> _Tensor:
    """flax's x.reshape(batch, -1) of [H, W, C], then nn.Dense. ONNX flattens NCHW in [C, H, W]
    order, so the kernel's rows are permuted from HWC to CHW order instead of the map."""
    c, h, w = x.shape
    kernel = s.param("kernel")
    rows = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
    flat = _Tensor(g.op("Flatten", [x.name], f"{s.path}/flatten", axis=1), (c * h * w,))
    return dense(g, _Scope({**s.params, "kernel": rows}, s.stats, s.path), flat)


def mean_pool(g: _Graph, x: _Tensor, path: str) -> _Tensor:
    """jnp.mean over H and W: [C, H, W] -> [C]."""
    y = g.op("GlobalAveragePool", [x.name], f"{path}/pool")
    return _Tensor(g.op("Flatten", [y], f"{path}/flatten", axis=1), x.shape[:1])


def max_pool(g: _Graph, x: _Tensor, window: int, strides: int, padding: str,
             path: str) -> _Tensor:
    """nn.max_pool; ONNX MaxPool, like flax, never picks a padded position."""
    pads = _pads(x.shape[1:], (window, window), (strides, strides), padding)
    name = g.op("MaxPool", [x.name], f"{path}/max_pool", kernel_shape=[window, window],
                strides=[strides, strides], pads=_onnx_pads(pads))
    return _Tensor(name, (x.shape[0], *_spatial_out(x.shape[1:], (window, window),
                                                    (strides, strides), pads)))


def space_to_depth(g: _Graph, x: _Tensor, block: int, path: str) -> _Tensor:
    """models/resnet.space_to_depth: ONNX SpaceToDepth, whose channel order is the same."""
    c, h, w = x.shape
    name = g.op("SpaceToDepth", [x.name], f"{path}/space_to_depth", blocksize=block)
    return _Tensor(name, (c * block * block, h // block, w // block))


# -- Backbones: each mirrors its flax module's __call__ at eval (dropout and DropBlock are off) ----


def iresnet(g: _Graph, s: _Scope, m: IResNet, x: _Tensor) -> _Tensor:
    """models/iresnet.py: [3, H, W] -> [D]."""
    pad1 = ((1, 1), (1, 1))
    nrm = lambda scope, y: norm(g, scope, y, m.norm, m.norm_groups)  # noqa: E731
    x = conv(g, s["conv1"], x, 1, pad1)
    x = prelu(g, s["prelu"], nrm(s["bn1"], x))
    for i, (size, width) in enumerate(zip(m.stage_sizes, m.widths)):
        for j in range(size):
            b, strides = s[f"layer{i + 1}_{j}"], 2 if j == 0 else 1
            y = conv(g, b["conv1"], nrm(b["bn1"], x), 1, pad1)
            y = prelu(g, b["prelu"], nrm(b["bn2"], y))
            y = nrm(b["bn3"], conv(g, b["conv2"], y, strides, pad1))
            if x.shape[0] != width or strides != 1:
                x = nrm(b["downsample_bn"], conv(g, b["downsample"], x, strides, "VALID"))
            x = add(g, x, y, b.path)
    x = flatten_dense(g, s["fc"], nrm(s["bn2"], x))
    return _embedding_norm(g, s["features"], x, m.norm)


def _embedding_norm(g: _Graph, s: _Scope, x: _Tensor, kind: str) -> _Tensor:
    """heads.embedding_norm: BatchNorm1d for "batch", else LayerNorm, on [D]."""
    return batch_norm(g, s, x, 1e-5) if kind == "batch" else layer_norm(g, s, x, 1e-5)


def _conv_norm(g: _Graph, s: _Scope, x: _Tensor, m: Any, kernel: int = 1, strides: int = 1,
               groups: int = 1, act: str | None = "prelu") -> _Tensor:
    """mobilenet.ConvNorm: conv (padding kernel // 2) -> norm -> PReLU, ReLU6 or nothing."""
    pad = kernel // 2
    x = conv(g, s.auto("Conv"), x, strides, ((pad, pad), (pad, pad)), groups)
    x = norm(g, s.auto("Norm"), x, m.norm, m.norm_groups)
    if act == "prelu":
        return prelu(g, s.auto("PReLU"), x)
    return relu6(g, x, s.path) if act == "relu6" else x


def mobilefacenet(g: _Graph, s: _Scope, m: MobileFaceNet, x: _Tensor) -> _Tensor:
    """models/mobilenet.py MobileFaceNet: [3, H, W] -> [D]."""
    ch = lambda c: max(1, int(round(c * m.width_multiplier)))  # noqa: E731
    x = _conv_norm(g, s.auto("ConvNorm"), x, m, 3, 2)
    x = _conv_norm(g, s.auto("ConvNorm"), x, m, 3, 1, groups=ch(64))
    stages = [(ch(128), m.blocks[1], ch(128), ch(128)),
              (ch(256), m.blocks[2], ch(256), ch(256)),
              (ch(256), m.blocks[3], ch(256), ch(512))]
    for out, n, groups, down in stages:
        x = _depthwise(g, s.auto("DepthWise"), x, m, down, 2, residual=False)
        for _ in range(n):
            x = _depthwise(g, s.auto("DepthWise"), x, m, groups, 1, residual=True)
    x = _conv_norm(g, s.auto("ConvNorm"), x, m, 1)
    channels, h, w = x.shape
    gdc = s["gdc"]
    if gdc.param("kernel").shape[:2] != (h, w):
        raise ValueError(f"{gdc.path}: a {gdc.param('kernel').shape[:2]} kernel on a {(h, w)} "
                         f"map: the config's image_size is not the one the model was trained at")
    x = conv(g, gdc, x, 1, "VALID", channels)
    x = norm(g, s["gdc_norm"], x, m.norm, m.norm_groups)
    x = flatten_dense(g, s["fc"], x)
    return _embedding_norm(g, s["features"], x, m.norm)


def _depthwise(g: _Graph, s: _Scope, x: _Tensor, m: MobileFaceNet, groups: int, strides: int,
               *, residual: bool) -> _Tensor:
    """mobilenet.DepthWise: 1x1 expand, k x k depthwise, 1x1 linear projection (+ input)."""
    y = _conv_norm(g, s.auto("ConvNorm"), x, m, 1)
    y = _conv_norm(g, s.auto("ConvNorm"), y, m, 3, strides, groups=groups)
    y = _conv_norm(g, s.auto("ConvNorm"), y, m, 1, act=None)
    return add(g, x, y, s.path) if residual else y


def mobilenetv2(g: _Graph, s: _Scope, m: MobileNetV2, x: _Tensor) -> _Tensor:
    """models/mobilenet.py MobileNetV2: [3, H, W] -> [1280 * width, H / 32, W / 32]."""
    x = _conv_norm(g, s.auto("ConvNorm"), x, m, 3, 2, act="relu6")
    for t, c, n, strides in m.settings:
        out = _make_divisible(c * m.width_multiplier)
        for j in range(n):
            b, stride = s.auto("InvertedResidual"), strides if j == 0 else 1
            hidden = x.shape[0] * t
            y = _conv_norm(g, b.auto("ConvNorm"), x, m, 1, act="relu6") if t != 1 else x
            y = _conv_norm(g, b.auto("ConvNorm"), y, m, 3, stride, groups=hidden, act="relu6")
            y = _conv_norm(g, b.auto("ConvNorm"), y, m, 1, act=None)
            x = add(g, x, y, b.path) if stride == 1 and x.shape[0] == out else y
    return _conv_norm(g, s.auto("ConvNorm"), x, m, 1, act="relu6")


def resnet(g: _Graph, s: _Scope, m: ResNet, x: _Tensor) -> _Tensor:
    """models/resnet.py: [3, H, W] -> [C, H / 2**k, W / 2**k]."""
    nrm = lambda scope, y: norm(g, scope, y, m.norm, m.norm_groups)  # noqa: E731
    same = lambda k: "SAME" if k > 1 else "VALID"  # noqa: E731
    if m.stem == "imagenet":
        x = relu(g, nrm(s["stem_norm"], conv(g, s["stem"], x, 2, ((3, 3), (3, 3)))), s.path)
        x = max_pool(g, x, 3, 2, "SAME", s.path)
    else:
        if m.stem == "space_to_depth":
            x = space_to_depth(g, x, 2, s.path)
        x = relu(g, nrm(s["stem_norm"], conv(g, s["stem"], x, m.stem_strides, "SAME")), s.path)
    for i, (size, width) in enumerate(zip(m.stage_sizes, m.widths)):
        for j in range(size):
            b, strides = s[f"stage{i + 1}_block{j + 1}"], 2 if i > 0 and j == 0 else 1
            if m.block == "basic":
                out = width
                y = relu(g, nrm(b["norm1"], conv(g, b["conv1"], x, strides, same(3))), b.path)
                y = nrm(b["norm2"], conv(g, b["conv2"], y, 1, same(3)))
            else:
                out = width * 4
                y = relu(g, nrm(b["norm1"], conv(g, b["conv1"], x, 1, same(1))), b.path)
                y = relu(g, nrm(b["norm2"], conv(g, b["conv2"], y, strides, same(3))), b.path)
                y = nrm(b["norm3"], conv(g, b["conv3"], y, 1, same(1)))
            if x.shape[0] != out or strides != 1:
                x = nrm(b["proj_norm"], conv(g, b["proj"], x, strides, same(1)))
            x = relu(g, add(g, x, y, b.path), b.path)
    return x


def convnext(g: _Graph, s: _Scope, m: ConvNeXt, x: _Tensor) -> _Tensor:
    """models/convnext.py: [3, H, W] -> [dims[-1], H / 32, W / 32]."""
    def nrm(scope: _Scope, y: _Tensor) -> _Tensor:
        if m.norm == "layer":  # nn.LayerNorm over the channels at each position
            return layer_norm(g, scope, y, 1e-6)
        return norm(g, scope, y, m.norm, m.norm_groups, 1e-6)

    x = nrm(s["stem_norm"], conv(g, s["stem"], x, 4, "VALID"))
    for i, (depth, dim) in enumerate(zip(m.depths, m.dims)):
        if i > 0:
            x = conv(g, s[f"down{i}"], nrm(s[f"down{i}_norm"], x), 2, "VALID")
        for j in range(depth):
            b = s[f"stage{i + 1}_block{j + 1}"]
            y = nrm(b["norm"], conv(g, b["dwconv"], x, 1, "SAME", dim))
            y = dense_on_map(g, b["pwconv2"], gelu(g, dense_on_map(g, b["pwconv1"], y), b.path))
            gamma = g.weight(f"{b.path}/gamma", _per_channel(b.param("gamma"), y))
            y = _Tensor(g.op("Mul", [y.name, gamma], f"{b.path}/layer_scale"), y.shape)
            x = add(g, x, y, b.path)
    return x


_BACKBONES = ((IResNet, iresnet), (MobileFaceNet, mobilefacenet), (MobileNetV2, mobilenetv2),
              (ResNet, resnet), (ConvNeXt, convnext))


def embedding_graph(model: FaceModel, variables: Mapping[str, Any], image_size: int) -> _Graph:
    """FaceModel.embed at eval as ONNX nodes, from the input `data` [batch, 3, size, size]."""
    s = _Scope(variables["params"], variables.get("batch_stats", {}), "")
    g = _Graph()
    x = _Tensor(INPUT_NAME, (3, image_size, image_size))
    write = next((fn for cls, fn in _BACKBONES if isinstance(model.backbone, cls)), None)
    if write is None:
        raise ValueError(f"cannot export a {type(model.backbone).__name__} backbone to ONNX; the "
                         f"exporter knows {[cls.__name__ for cls, _ in _BACKBONES]}")
    x = write(g, s["backbone"], model.backbone, x)
    if len(x.shape) == 3:  # a feature map: FaceModel's EmbeddingHead pools and projects it
        head = s["embed_head"]
        x = (flatten_dense(g, head["proj"], x) if model.pool == "flatten"
             else dense(g, head["proj"], mean_pool(g, x, head.path)))
        if model.embedding_norm:
            x = _embedding_norm(g, head["features"], x, model.embedding_norm)
    g.nodes.append(helper.make_node("Identity", [x.name], [OUTPUT_NAME], name=OUTPUT_NAME))
    return g


def to_onnx(model: FaceModel, variables: Mapping[str, Any], image_size: int, *,
            metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """The ONNX model of `model.embed` at eval: input `data` float32 [batch, 3, size, size]
    (normalised RGB), output `embedding` float32 [batch, embedding_dim], unnormalised."""
    g = embedding_graph(model, variables, image_size)
    graph = helper.make_graph(
        g.nodes, "jfacerec_embedding",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                       ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                       ["batch", model.embedding_dim])],
        initializer=g.weights)
    proto = helper.make_model(graph, producer_name="jfacerec",
                              opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    proto.doc_string = (f"Face embeddings: input {INPUT_NAME} normalised as {NORMALIZATION}; "
                        f"output {OUTPUT_NAME}, not L2-normalised.")
    helper.set_model_props(proto, {"normalization": NORMALIZATION, **(metadata or {})})
    return proto


def write_onnx(proto: onnx.ModelProto, out: str) -> None:
    """Checks `proto` (onnx.checker, with shape inference), then writes it to `out` atomically:
    an existing file is replaced whole or left as it was."""
    onnx.checker.check_model(proto, full_check=True)
    with atomic_open(out, "wb") as f:
        f.write(proto.SerializeToString())


def check_output_path(out: str) -> None:
    """ValueError, naming `out`, when it cannot be a file: a folder, or below a plain file."""
    if storage.is_remote(out):  # an object store has no folders to be in the way
        return
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder: name the .onnx file to write")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: {parent} is a file, not a folder: write elsewhere")
    if not os.access(parent, os.W_OK):
        raise PermissionError(13, "permission denied", out)


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `export_workdir` wrote."""

    out: str
    model_name: str
    step: int
    image_size: int
    embedding_dim: int


def export_workdir(workdir: str, out: str, *, step: int | None = None) -> Exported:
    """The model trained in `workdir` (its newest intact checkpoint, or `step`) as ONNX at `out`.

    FileNotFoundError when `workdir` is not a workdir or holds no checkpoint; ValueError when
    `out` cannot be written or the model has no exporter. Nothing is written on failure.
    """
    check_output_path(out)
    config = workdir_files.read_config(workdir)
    restored = restore(config, workdir, step=step)
    image_size = int(config.image_size)
    proto = to_onnx(restored.model, jax.device_get(restored.variables), image_size, metadata={
        "jfacerec.model": str(config.model.name), "jfacerec.step": str(restored.step),
        "jfacerec.workdir": storage.absolute(workdir)})
    write_onnx(proto, out)
    return Exported(out, str(config.model.name), restored.step, image_size,
                    int(restored.model.embedding_dim))
