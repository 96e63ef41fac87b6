"""The weights of an ONNX face model, read from its graph's structure, onto arcface_torch's layers.

The graph is walked in node order (ONNX keeps nodes topologically sorted) for its weighted ops:
Conv, BatchNormalization, PRelu, and Gemm or MatMul (+ a constant Add: the bias). They are
matched in turn to `arcface_torch.layers(model)`, which lists the same layers in forward order, so
initialiser names do not matter: an export that keeps PyTorch's names and one whose names are gone
read alike. A BatchNormalization is a conv's when it reads that conv's output (dataflow, not
position).
Weights may sit behind constant-only nodes (Constant, Unsqueeze, Reshape, Transpose, ...), which
are evaluated here with NumPy.

Folded BatchNorms. An exporter that constant-folds a BatchNorm into the conv before it leaves a
Conv with a bias and no BatchNormalization; our convs have no bias, so the layer's BatchNorm gets
identity statistics (mean 0, var 1 - eps, scale 1) and the bias as its shift, which computes the
same function. A conv bias followed by a real BatchNormalization is moved into its mean.

Input normalisation inside the graph (Sub / Mul / Div / Add of constants before the first conv,
as mxnet-era insightface models have) is folded into the first conv when it is x * s - 127.5 * s
per channel (the pipeline already gives (x - 127.5) / 127.5); another shift is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jfacerec.core import storage
from jfacerec.interop.arcface_torch import BN_EPS, SUPPORTED, Layer

_CONSTANT_OPS = ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Transpose")
_PASS_THROUGH = ("Identity", "Dropout", "Cast")
_AFFINE_OPS = ("Sub", "Add", "Mul", "Div")


@dataclasses.dataclass
class _Op:
    """A weighted node: kind (as Layer.kind), its weights in PyTorch's layouts, the tensor it
    reads (before any Identity / Dropout / Cast) and the one it writes, its bias (convs and linear
    layers), and whether a linear layer's input was flattened from [H, W, C] (a Transpose to
    channels-last before the Flatten / Reshape)."""

    kind: str
    name: str
    weights: dict[str, np.ndarray]
    input: str
    output: str
    bias: np.ndarray | None = None
    hwc: bool = False


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _axes(node: Any, inputs: list[np.ndarray]) -> list[int] | None:
    if len(inputs) > 1:
        return [int(a) for a in inputs[1].reshape(-1)]
    axes = _attrs(node).get("axes")
    return None if axes is None else [int(a) for a in axes]


def _evaluate(node: Any, inputs: list[np.ndarray]) -> np.ndarray:
    """A constant-only node's output."""
    import onnx

    x, op, attrs = inputs[0], node.op_type, _attrs(node)
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Transpose":
        return x.transpose(attrs.get("perm"))
    if op == "Unsqueeze":
        axes = _axes(node, inputs)
        rank = x.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            x = np.expand_dims(x, axis)
        return x
    if op == "Squeeze":
        axes = _axes(node, inputs)
        return np.squeeze(x, None if axes is None else tuple(a % x.ndim for a in axes))
    shape = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(inputs[1].reshape(-1))]
    return x.reshape(shape)


class _Graph:
    """An ONNX graph's constants (initialisers, Constant nodes, and what constant-only nodes make
    of them), the producer of each tensor, and its weighted ops in node order."""

    def __init__(self, graph: Any, path: str):
        from onnx import numpy_helper

        self.path = path
        self.graph = graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant":
                self.constants[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
            elif node.op_type in _CONSTANT_OPS and node.input and all(
                    not name or name in self.constants for name in node.input):
                self.constants[node.output[0]] = _evaluate(
                    node, [self.constants[name] for name in node.input if name])

    def constant(self, node: Any, position: int) -> np.ndarray:
        name = node.input[position] if position < len(node.input) else ""
        if name not in self.constants:
            raise ValueError(f"{self.path}: node {node.name or node.op_type} ({node.op_type}) "
                             f"takes its weights from a computed tensor {name!r}, not a constant; "
                             f"export the model in eval mode with its weights as initialisers")
        return np.asarray(self.constants[name], np.float32)

    def source(self, name: str) -> str:
        """The tensor `name` is a copy of, through Identity / Dropout / Cast nodes."""
        while (node := self.producer.get(name)) is not None and node.op_type in _PASS_THROUGH:
            name = node.input[0]
        return name

    def flattened_channels_last(self, name: str) -> bool:
        """Whether tensor `name` is a Flatten / Reshape of a Transpose to [N, H, W, C]."""
        node = self.producer.get(self.source(name))
        if node is None or node.op_type not in ("Flatten", "Reshape"):
            return False
        before = self.producer.get(self.source(node.input[0]))
        if before is None or before.op_type != "Transpose":
            return False
        attrs = _attrs(before)
        return list(attrs.get("perm", [])) == [0, 2, 3, 1]

    def ops(self) -> list[_Op]:
        out = []
        for index, node in enumerate(self.graph.node):
            if op := self._op(index, node):
                out.append(op)
        return out

    def _op(self, index: int, node: Any) -> _Op | None:
        op, name = node.op_type, node.name or f"#{index}"
        if op == "Conv":
            bias = self.constant(node, 2) if len(node.input) > 2 and node.input[2] else None
            return _Op("conv", name, {"weight": self.constant(node, 1)},
                       self.source(node.input[0]), node.output[0], bias)
        if op == "BatchNormalization":
            attrs = _attrs(node)
            eps = float(attrs.get("epsilon", 1e-5))
            weights = {key: self.constant(node, i + 1) for i, key in enumerate(
                ("weight", "bias", "running_mean", "running_var"))}
            weights["running_var"] = weights["running_var"] + np.float32(eps - BN_EPS)
            return _Op("bn", name, weights, self.source(node.input[0]), node.output[0])
        if op == "PRelu":
            return _Op("prelu", name, {"weight": self.constant(node, 1).reshape(-1)},
                       node.input[0], node.output[0])
        if op == "Gemm":
            return self._gemm(name, node)
        if op == "MatMul" and node.input[1] in self.constants:
            return self._matmul(name, node)
        return None

    def _gemm(self, name: str, node: Any) -> _Op:
        attrs = _attrs(node)
        if attrs.get("transA", 0):
            raise ValueError(f"{self.path}: Gemm {name} transposes its input (transA); "
                             f"export the model with a plain Linear layer")
        weight = self.constant(node, 1) * np.float32(attrs.get("alpha", 1.0))
        weight = weight if attrs.get("transB", 0) else weight.T
        bias = (self.constant(node, 2).reshape(-1) * np.float32(attrs.get("beta", 1.0))
                if len(node.input) > 2 and node.input[2] else None)
        return _Op("linear", name, {"weight": weight}, node.input[0],
                   node.output[0], bias, self.flattened_channels_last(node.input[0]))

    def _matmul(self, name: str, node: Any) -> _Op:
        """x @ W [in, out], and the constant Add after it (its only consumer) as the bias."""
        output, bias = node.output[0], None
        after = self.consumers.get(output, [])
        if len(after) == 1 and after[0].op_type == "Add":
            other = [name for name in after[0].input if name != output]
            if len(other) == 1 and other[0] in self.constants:
                output, bias = after[0].output[0], self.constant(after[0], list(
                    after[0].input).index(other[0])).reshape(-1)
        return _Op("linear", name, {"weight": self.constant(node, 1).T}, node.input[0], output,
                   bias, self.flattened_channels_last(node.input[0]))

    def input_scale(self, first_conv_input: str) -> np.ndarray | None:
        """The per-channel scale s of the normalisation x * s - 127.5 * s that the graph applies
        to its input before the first conv ([1] or [3]), None when it applies none; ValueError
        for any other computation there."""
        scale, shift = np.ones(1, np.float64), np.zeros(1, np.float64)
        name, found = first_conv_input, False
        while (node := self.producer.get(name)) is not None:
            if node.op_type in _PASS_THROUGH:
                name = node.input[0]
                continue
            variable = [n for n in node.input if n not in self.constants]
            if node.op_type not in _AFFINE_OPS or len(variable) != 1:
                raise ValueError(f"{self.path}: the graph computes {node.op_type} "
                                 f"({node.name}) on its input before the first Conv; only a "
                                 f"normalisation (Sub, Mul, Div, Add of constants) is understood")
            value = np.asarray(self.constants[next(n for n in node.input if n != variable[0])],
                               np.float64).reshape(-1)
            scale, shift = _compose(node.op_type, value, scale, shift,
                                    first=list(node.input).index(variable[0]) == 0)
            name, found = variable[0], True
        if not found:
            return None
        if not np.allclose(shift, -127.5 * scale, rtol=1e-4, atol=1e-6):
            raise ValueError(f"{self.path}: the graph normalises its input as x * {scale} + "
                             f"{shift}; jfacerec feeds (x - 127.5) / 127.5 and can only take a "
                             f"normalisation centred at 127.5")
        return scale


def _compose(op: str, value: np.ndarray, scale: np.ndarray, shift: np.ndarray,
             *, first: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) such that scale * u + shift is what the walk has met so far (scale * t +
    shift) with t = op(u, value): the walk goes from the conv back to the input. `first`: u is the
    node's first input."""
    if op == "Add":
        return scale, shift + scale * value
    if op == "Sub":
        return (scale, shift - scale * value) if first else (-scale, shift + scale * value)
    if op == "Mul":
        return scale * value, shift
    if not first:
        raise ValueError("a constant divided by the input")
    return scale / value, shift


def _identity_bn(bias: np.ndarray) -> dict[str, np.ndarray]:
    """A BatchNorm computing x + bias (a BatchNorm folded into the conv before it)."""
    ones = np.ones_like(bias)
    return {"weight": ones, "bias": bias, "running_mean": np.zeros_like(bias),
            "running_var": ones - np.float32(BN_EPS)}


def _chw_columns(weight: np.ndarray, channels: int) -> np.ndarray:
    """Linear weight [out, H*W*C] (channels-last flattening) -> [out, C*H*W] (PyTorch's)."""
    out_features, in_features = weight.shape
    side = int(round((in_features // channels) ** 0.5))
    return (weight.reshape(out_features, side, side, channels).transpose(0, 3, 1, 2)
            .reshape(out_features, in_features))


def _match(ops: list[_Op], spec: Sequence[Layer], path: str) -> list[dict[str, np.ndarray]]:
    """Each layer of `spec` with the weights of the op that computes it (a BatchNorm folded into
    the conv before it: the identity and that conv's bias)."""
    out: list[dict[str, np.ndarray]] = []
    i = 0  # the next op
    pending = None  # the bias of the last conv / linear op, which its layer has not taken
    weighted = None  # that op, when the previous layer was a conv or linear one

    def mismatch(layer: Layer, found: str) -> ValueError:
        return ValueError(f"{path}: where the model has its layer {layer.torch} ({layer.kind}), "
                          f"the graph has {found}: it is of another architecture; pass the "
                          f"--model it was exported from (one of {', '.join(SUPPORTED)})")

    for layer in spec:
        op = ops[i] if i < len(ops) else None
        found = f"node {op.name} ({op.kind})" if op else "no more weighted nodes"
        if layer.kind == "bn":
            if op is not None and op.kind == "bn" and (weighted is None
                                                       or op.input == weighted.output):
                weights = dict(op.weights)
                if pending is not None:
                    weights["running_mean"] = weights["running_mean"] - pending
                out.append(weights)
                i += 1
            elif pending is not None:
                out.append(_identity_bn(pending))
            else:
                raise mismatch(layer, found)
            pending, weighted = None, None
            continue
        if pending is not None:
            raise mismatch(layer, f"a bias on {weighted.name} that no BatchNorm takes")
        if op is None or op.kind != layer.kind:
            raise mismatch(layer, found)
        weights = dict(op.weights)
        if layer.kind == "linear" and op.hwc and layer.flat_channels:
            weights["weight"] = _chw_columns(weights["weight"], layer.flat_channels)
        if layer.bias:
            weights["bias"] = op.bias if op.bias is not None else np.zeros(
                weights["weight"].shape[0], np.float32)
        else:
            pending = op.bias
        weighted = op if layer.kind in ("conv", "linear") else None
        out.append(weights)
        i += 1
    if pending is not None:
        raise mismatch(spec[-1], f"a bias on {weighted.name} that no BatchNorm takes")
    if i < len(ops):
        raise ValueError(f"{path}: {len(ops) - i} weighted nodes after the model's last layer "
                         f"(from {ops[i].name}): it is of another architecture; pass the --model "
                         f"it was exported from (one of {', '.join(SUPPORTED)})")
    return out


def _load(path: str) -> Any:
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; pass an ONNX model file")
    try:
        import onnx
    except ImportError:
        raise ValueError("reading ONNX files needs the onnx package: pip install onnx") from None
    try:
        with storage.open(path, "rb") as f:
            return onnx.load(f)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors share no base
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                         f"{str(e)[:120]}); the file is truncated or of another format") from e


def read_layers(path: str, spec: Sequence[Layer]) -> list[dict[str, np.ndarray]]:
    """The weights of each layer of `spec` (arcface_torch.layers(model)) in PyTorch's layouts,
    from the ONNX model at `path`. ValueError naming the file when its graph computes something
    else (another architecture, an unsupported input normalisation, weights that are not
    constants)."""
    proto = _load(path)
    try:
        graph = _Graph(proto.graph, path)
        ops = graph.ops()
    except (KeyError, IndexError, TypeError) as e:  # a node without the inputs its op needs
        raise ValueError(f"{path}: a malformed graph ({type(e).__name__}: {e}); export the "
                         f"model again") from e
    if not ops or ops[0].kind != "conv":
        raise ValueError(f"{path}: the graph does not start with a Conv; it is no face backbone "
                         f"of {', '.join(SUPPORTED)}")
    weights = _match(ops, spec, path)
    scale = graph.input_scale(ops[0].input)
    if scale is not None:
        per_channel = (127.5 * scale).astype(np.float32).reshape(1, -1, 1, 1)
        weights[0] = {**weights[0], "weight": weights[0]["weight"] * per_channel}
    return weights
