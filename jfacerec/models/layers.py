"""Building blocks shared by the backbones: normalisation chosen by name, convolutions."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "group", "layer", "instance")


def _divisor_at_most(channels: int, groups: int) -> int:
    """The largest divisor of `channels` that is at most `groups` (GroupNorm needs one)."""
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, over_batch: bool,
               eps: float, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises x [batch, positions, channels] per group of channels, then scales and shifts.

    Statistics are taken over the positions and the group's channels, and also over the batch
    when `over_batch` (BatchNorm: one group per channel). scale, bias: float32 [channels].
    Returns y [batch, positions, channels] in `dtype`, and the mean and var [1 or batch, groups]:
    flax's BatchNorm / GroupNorm arithmetic (statistics in float32 or wider, var = E[x^2] -
    E[x]^2 clipped at 0, y = (x - mean) * scale / sqrt(var + eps) + bias).

    Why not flax's modules: the gradient autodiff derives from them is several passes over the
    activations per norm; the backward below is one reducing pass over (dy, x) and one
    elementwise pass. Every large reduction is a per-channel sum over positions (and batch),
    which XLA:CPU hands to its fast reduction library; the group sums come after, on
    [batch, channels].
    """
    return _normalize_fwd(x, scale, bias, groups, over_batch, eps, dtype)[0]


def _per_channel(x: jax.Array, over_batch: bool) -> jax.Array:
    """Sums of x [batch, positions, channels] over positions (and batch): [1 or batch, channels]."""
    return jnp.sum(x, (0, 1))[None] if over_batch else jnp.sum(x, 1)


def _group_sum(x: jax.Array, groups: int) -> jax.Array:
    """[rows, channels] -> [rows, groups]: sums over each group's consecutive channels."""
    return jnp.sum(x.reshape(x.shape[0], groups, -1), -1)


def _count(x: jax.Array, groups: int, over_batch: bool) -> int:
    """How many values of x [batch, positions, channels] each group's statistics cover."""
    return x.shape[1] * x.shape[2] // groups * (x.shape[0] if over_batch else 1)


def _to_channels(x: jax.Array, channels: int) -> jax.Array:
    """[rows, groups] -> [rows, 1, channels]: each group's value on each of its channels."""
    return jnp.repeat(x, channels // x.shape[1], axis=1)[:, None, :]


def _normalize_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                   over_batch: bool, eps: float, dtype: Any) -> tuple[tuple, tuple]:
    """(_normalize's outputs, the residuals its backward needs)."""
    channels, count = x.shape[2], _count(x, groups, over_batch)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = _group_sum(_per_channel(x32, over_batch), groups) / count
    var = jnp.maximum(_group_sum(_per_channel(x32 * x32, over_batch), groups) / count
                      - mean * mean, 0.0)
    inv = jax.lax.rsqrt(var + eps)
    y = (x32 - _to_channels(mean, channels)) * (_to_channels(inv, channels) * scale) + bias
    return (y.astype(dtype), mean, var), (x, scale, mean, inv)


def _normalize_bwd(groups: int, over_batch: bool, eps: float, dtype: Any, residuals: tuple,
                   cotangents: tuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cotangents of (x, scale, bias) from those of (y, mean, var)."""
    del eps, dtype
    x, scale, mean, inv = residuals
    dy, dmean, dvar = cotangents
    channels, count = x.shape[2], _count(x, groups, over_batch)
    dy = dy.astype(mean.dtype)
    centred = x.astype(mean.dtype) - _to_channels(mean, channels)
    inv_c = _to_channels(inv, channels)  # [rows, 1, channels]
    # One pass over (dy, x): per channel, the sums of dy and of dy * (x - mean).
    sum_dy = _per_channel(dy, over_batch)
    sum_dyc = _per_channel(dy * centred, over_batch)
    dbias = jnp.sum(sum_dy, 0)
    dscale = jnp.sum(sum_dyc * inv_c[:, 0], 0)  # sum of dy * xhat, xhat = (x - mean) * inv
    # With dxhat = dy * scale: dx = inv (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), plus the
    # mean and var outputs' own cotangents (d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n),
    # gathered as dx = inv * scale * dy + c1 * (x - mean) + c0, c1 and c0 per group.
    g = _group_sum(scale * sum_dy, groups)  # sum of dxhat
    gx = _group_sum(scale * sum_dyc, groups) * inv  # sum of dxhat * xhat
    c1 = (2.0 * dvar - inv * inv * gx) / count
    c0 = (dmean - inv * g) / count
    dx = dy * (inv_c * scale) + centred * _to_channels(c1, channels) + _to_channels(c0, channels)
    return dx.astype(x.dtype), dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class _BatchNorm(nn.Module):
    """flax's nn.BatchNorm over every axis but the last: the same variables and arithmetic."""

    momentum: float
    eps: float
    dtype: Any
    scale_init: Any

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        channels = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        if not train:
            y = (x.astype(jnp.float32) - ra_mean.value) * (
                jax.lax.rsqrt(ra_var.value + self.eps) * scale) + bias
            return y.astype(self.dtype)
        y, mean, var = _normalize(x.reshape(x.shape[0], -1, channels), scale, bias, channels,
                                  True, self.eps, self.dtype)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean[0]
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var[0]
        return y.reshape(x.shape)


class _GroupNorm(nn.Module):
    """flax's nn.GroupNorm: per example, statistics over space and each group's channels."""

    groups: int
    eps: float
    dtype: Any
    scale_init: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        y, _, _ = _normalize(x.reshape(x.shape[0], -1, channels), scale, bias, self.groups,
                             False, self.eps, self.dtype)
        return y.reshape(x.shape)


class Norm(nn.Module):
    """Normalisation of a `[batch, ..., channels]` tensor, selected by `kind`.

    - batch: statistics over batch and space; running averages at eval. Under `jit` with the batch
      sharded over the `data` mesh axis, the mean is taken over the global batch.
    - group: `groups` channel groups (reduced to a divisor of the channel count), stats per example.
    - layer: one group spanning all of space and channels (LayerNorm over H, W, C).
    - instance: one group per channel.

    Variables and outputs are those of flax's nn.BatchNorm and nn.GroupNorm, in submodules of the
    same names (BatchNorm_0, GroupNorm_0) so that checkpoints carry over; see `_normalize` for
    why the arithmetic is written out here.
    """

    kind: str = "group"
    groups: int = 32
    eps: float = 1e-5
    momentum: float = 0.9
    dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        channels = x.shape[-1]
        if self.kind == "batch":
            return _BatchNorm(self.momentum, self.eps, self.dtype, self.scale_init,
                              name="BatchNorm_0")(x, train=train)
        if self.kind == "group":
            groups = _divisor_at_most(channels, self.groups)
        elif self.kind == "layer":
            groups = 1
        elif self.kind == "instance":
            groups = channels
        else:
            raise ValueError(f"unknown norm {self.kind!r}; choose one of {NORMS}")
        return _GroupNorm(groups, self.eps, self.dtype, self.scale_init, name="GroupNorm_0")(x)


def conv_kernel_init() -> Any:
    """He-normal (fan-out) initialisation, as torchvision and arcface_torch use for convs."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                     out_spec=(0, 3, 1, 2))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
    """jax.lax.conv_general_dilated, computed as a sum over the kernel's taps where XLA:CPU's own
    lowering is slow; pass it to nn.Conv(conv_general_dilated=...).

    lhs [batch, height, width, in], rhs [kh, kw, in / groups, out] (flax's layout). Two cases go
    tap by tap, each tap a strided slice of the padded input:
    - grouped and depthwise convs (feature_group_count > 1): XLA:CPU expands the groups into a
      dense conv with a block-diagonal kernel, `groups` times the work (MobileFaceNet's 3x3
      depthwise convs ran at ~0.1 GFLOP/s); here each tap is a broadcast multiply-add, fused.
    - standard convs on maps with fewer positions than the kernel has taps (a 3x3 kernel on a
      2x2 map): XLA swaps the operands into a layout that only its naive loop emitter runs,
      forward and for the input gradient; here each tap is a matmul.
    Standard convs with strides above 1 keep XLA's forward, with gradients from `_strided_conv`.
    Everything else (any dilation, other backends) goes to jax.lax.conv_general_dilated.
    """
    spatial = lhs.shape[1:3]
    kernel = rhs.shape[:2]
    strides = tuple(window_strides)
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    nhwc = dimension_numbers is None or jax.lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, dimension_numbers) == _NHWC
    pads = (jax.lax.padtype_to_pads(spatial, kernel, strides, padding)
            if isinstance(padding, str) else tuple(tuple(p) for p in padding))
    out = _out_positions([n + lo + hi for n, (lo, hi) in zip(spatial, pads)], kernel, strides)
    taps = kernel[0] * kernel[1]
    small = min(spatial[0] * spatial[1], out[0] * out[1]) < taps
    rewritable = (jax.default_backend() == "cpu" and not dilated and nhwc
                  and batch_group_count == 1 and lhs.ndim == 4)
    standard = feature_group_count == 1 and not small  # XLA's own forward is fast
    if (rewritable and standard and preferred_element_type is None
            and any(s > 1 for s in strides)):
        return _strided_conv(lhs, rhs, strides, pads, precision)
    if not rewritable or standard:
        return jax.lax.conv_general_dilated(
            lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    acc = jnp.promote_types(out_dtype, jnp.float32)
    batch, groups = lhs.shape[0], feature_group_count
    group_in, features = rhs.shape[2], rhs.shape[3]
    positions = [(i, j) for i in range(kernel[0]) for j in range(kernel[1])]
    if groups > 1 and group_in == features // groups:
        w = jnp.stack([jnp.stack([_shifted_weights(rhs[i, j].astype(acc))
                                  for j in range(kernel[1])]) for i in range(kernel[0])])
        return _shifted_conv(lhs.astype(acc), w, strides, pads).astype(out_dtype)
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))

    def tap(i: int, j: int) -> jax.Array:
        """[batch, out_h, out_w, in]: the inputs kernel position (i, j) sees."""
        return _window(x, (i, j, 0), (*out, x.shape[3]), strides)

    if groups == 1:
        y = sum(jnp.dot(tap(i, j), rhs[i, j], precision=precision, preferred_element_type=acc)
                for i, j in positions)
        return y.astype(out_dtype)
    y = jnp.zeros((batch, *out, groups, features // groups), acc)
    for i, j in positions:
        t = tap(i, j).reshape(batch, *out, groups, group_in).astype(acc)
        w = rhs[i, j].reshape(group_in, groups, features // groups).astype(acc)
        for k in range(group_in):
            y = y + t[..., k, None] * w[k]
    return y.reshape(batch, *out, features).astype(out_dtype)


def _lax_conv(x: jax.Array, w: jax.Array, strides: Sequence[int],
              pads: Sequence[tuple[int, int]], precision: Any) -> jax.Array:
    """x [batch, h, w, in] conv w [kh, kw, in, out] by XLA's own convolution."""
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                        precision=precision)


def _phases(x: jax.Array, w: jax.Array, strides: tuple[int, int],
            pads: tuple[tuple[int, int], ...], precision: Any) -> jax.Array:
    """The strided conv of x [batch, h, w, in] by w [kh, kw, in, out], as a sum over the
    strides' phases of stride-1 convs: kernel positions (rh + sh * a, rw + sw * b) only ever see
    the padded input's rows rh, rh + sh, ... and columns rw, rw + sw, ..., so each phase is a
    stride-1 conv of that strided slice by w[rh::sh, rw::sw]."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = _out_positions(xp.shape[1:3], w.shape[:2], strides)
    y = None
    for rh in range(min(strides[0], w.shape[0])):
        for rw in range(min(strides[1], w.shape[1])):
            sub = w[rh::strides[0], rw::strides[1]]
            size = (out[0] + sub.shape[0] - 1, out[1] + sub.shape[1] - 1, xp.shape[3])
            term = _lax_conv(_window(xp, (rh, rw, 0), size, strides), sub, (1, 1),
                             ((0, 0), (0, 0)), precision)
            y = term if y is None else y + term
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                  pads: tuple[tuple[int, int], ...], precision: Any) -> jax.Array:
    """A standard conv with strides > 1: XLA's forward, the gradients through `_phases`.

    XLA:CPU computes a strided conv's input gradient as a conv over the output gradient dilated
    by the strides, mostly zeros, and a 1x1 strided conv's weight gradient as a conv with the
    whole map its window: 2-4x torch's time at 112x112x64 (benchmarks/README.md, "Train step").
    Through `_phases` the input gradient is sh * sw stride-1 convs of the output gradient,
    interleaved; a 1x1 kernel's weight gradient one matmul over the strided input. A larger
    kernel's weight gradient stays XLA's (its phases ran slower).
    """
    return _lax_conv(x, w, strides, pads, precision)


def _strided_conv_fwd(x, w, strides, pads, precision):
    return _lax_conv(x, w, strides, pads, precision), (x, w)


def _strided_conv_bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    phases = functools.partial(_phases, strides=strides, pads=pads, precision=precision)
    if w.shape[:2] == (1, 1):  # both gradients by phases, from one trace
        return jax.vjp(phases, x, w)[1](dy)
    dx = jax.vjp(lambda x: phases(x, w), x)[1](dy)[0]
    dw = jax.vjp(lambda w: _lax_conv(x, w, strides, pads, precision), w)[1](dy)[0]
    return dx, dw


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _out_positions(padded: Sequence[int], kernel: Sequence[int], strides: Sequence[int]
                   ) -> tuple[int, ...]:
    """Output rows and columns of a conv whose padded input has `padded` rows and columns."""
    return tuple((n - k) // s + 1 for n, k, s in zip(padded, kernel, strides))


def _window(x: jax.Array, start: tuple[int, int, int], size: Sequence[int],
            strides: Sequence[int] = (1, 1)) -> jax.Array:
    """x [batch, h, w, c] -> [batch, *size]: rows, columns (every strides-th) and channels from
    `start` on."""
    limit = (x.shape[0], *(b + s * (n - 1) + 1 for b, s, n in zip(start[:2], strides, size[:2])),
             start[2] + size[2])
    return jax.lax.slice(x, (0, *start), limit, (1, *strides, 1))


def _shifted_weights(w: jax.Array) -> jax.Array:
    """One kernel position's weights [in / groups, channels] of a grouped conv with as many
    outputs as inputs per group -> [2 * in / groups - 1, channels]: row d holds, for each output
    channel o, the weight of input channel o + d - (in / groups - 1), zero where that channel
    lies in another group."""
    group_in, channels = w.shape
    within = jnp.arange(channels) % group_in  # each output's position in its group
    rows = []
    for d in range(-(group_in - 1), group_in):
        k = within + d
        rows.append(jnp.where((k >= 0) & (k < group_in),
                              w[jnp.clip(k, 0, group_in - 1), jnp.arange(channels)], 0.0))
    return jnp.stack(rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                  pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """A grouped conv with as many outputs as inputs per group (depthwise: one per group), as a
    sum of shifted inputs times per-channel weights.

    x [batch, h, w, channels]; w [kh, kw, 2 * shift + 1, channels] from `_shifted_weights`, shift
    = in / groups - 1. Returns y [batch, out_h, out_w, channels], y[.., o] = sum over kernel
    positions (i, j) and d of x_padded[.., i + s * oh, j + s * ow, o + d - shift] * w[i, j, d, o].

    Everything stays on [batch, h, w, channels]: a [.., groups, in / groups] view makes autodiff
    reduce over a trailing axis of size in / groups, and the gradient autodiff derives for the
    input pads every term to the input's size (kh * kw * (2 shift + 1) padded copies, XLA
    recomputing the producer into each); the backward below computes the input gradient as one
    more sum of shifted windows, of the output gradient.
    """
    return _shifted_conv_fwd(x, w, strides, pads)[0]


def _shifted_input(x: jax.Array, w: jax.Array, pads: tuple[tuple[int, int], ...]
                   ) -> tuple[jax.Array, int]:
    """(x padded in space by `pads` and in channels by the shift on both sides, the shift).

    Behind an optimisation barrier: without it XLA recomputes x's producer (the previous norm
    and PReLU) into each of the many windows read from it; MobileFaceNet's step ran 11% faster
    with the barrier (benchmarks/README.md, "Train step").
    """
    shift = (w.shape[2] - 1) // 2
    return jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), *pads, (shift, shift)))), shift


def _shifted_conv_fwd(x, w, strides, pads):
    kh, kw, shifts, channels = w.shape
    xp, _ = _shifted_input(x, w, pads)
    out = _out_positions(xp.shape[1:3], w.shape[:2], strides)
    y = sum(_window(xp, (i, j, d), (*out, channels), strides) * w[i, j, d]
            for i in range(kh) for j in range(kw) for d in range(shifts))
    return y, (x, w)


def _shifted_conv_bwd(strides, pads, residuals, dy):
    x, w = residuals
    kh, kw, shifts, channels = w.shape
    xp, shift = _shifted_input(x, w, pads)
    out = dy.shape[1:3]
    # All the weight gradients in one variadic reduce: one pass over (x, dy) instead of one per
    # weight (kh * kw * shifts passes ran at a sixth of the speed). Over batch and columns here,
    # the rows after, which keeps float32 sums short.
    taps = [(i, j, d) for i in range(kh) for j in range(kw) for d in range(shifts)]
    products = tuple(_window(xp, t, (*out, channels), strides) * dy for t in taps)
    sums = jax.lax.reduce(products, tuple(jnp.zeros((), dy.dtype) for _ in taps),
                          lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 2))
    dw = jnp.sum(jnp.stack(sums), axis=1).reshape(w.shape)
    # The output gradient dilated by the strides and padded so that the input gradient, at every
    # padded-input position q, is the sum over kernel positions k of dy_dilated[q - k] w[k].
    padded = tuple(x.shape[1 + a] + sum(pads[a]) for a in range(2))
    config = [(0, 0, 0), *((kernel - 1, padded[a] - ((out[a] - 1) * strides[a] + 1),
                            strides[a] - 1) for a, kernel in enumerate((kh, kw))),
              (2 * shift, 2 * shift, 0)]
    e = jax.lax.pad(dy, jnp.zeros((), dy.dtype), config)
    # Channel o of the output took input channel o + d - shift with weight w[.., d, o]: back,
    # input channel c gets dy[c - d + shift] w[.., d, c - d + shift].
    wp = jnp.pad(w, ((0, 0), (0, 0), (0, 0), (2 * shift, 2 * shift)))
    size = (*x.shape[1:3], channels)
    dx = sum(_window(e, (kh - 1 - i + pads[0][0], kw - 1 - j + pads[1][0], 3 * shift - d), size)
             * wp[i, j, d, 3 * shift - d:3 * shift - d + channels]
             for i in range(kh) for j in range(kw) for d in range(shifts))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_shifted_conv.defvjp(_shifted_conv_fwd, _shifted_conv_bwd)


def conv2d(features: int, kernel_size: Sequence[int], strides: Sequence[int] = (1, 1),
           **kwargs: Any) -> nn.Conv:
    """The backbones' nn.Conv: their initialiser, computing through `conv_general_dilated`.

    Variables and names are nn.Conv's (so checkpoints carry over); kwargs go to nn.Conv.
    """
    return nn.Conv(features, kernel_size, strides, kernel_init=conv_kernel_init(),
                   conv_general_dilated=conv_general_dilated, **kwargs)


CONV_KINDS = ("standard", "depthwise", "pointwise", "separable")


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
    return -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1


def conv_multiplies(kind: str, height: int, width: int, in_channels: int, out_channels: int,
                    kernel: int, *, stride: int = 1, padding: str = "SAME",
                    multiplier: int = 1) -> int:
    """Multiplications one convolution layer performs on one [height, width, in_channels] input.

    standard:  H' W' N M K^2;  depthwise: H' W' M mult K^2 (N = M mult);  pointwise: H W N M;
    separable: depthwise (mult 1) then pointwise, H' W' M K^2 + H' W' M N.
    """
    h = _out_size(height, kernel, stride, padding)
    w = _out_size(width, kernel, stride, padding)
    if kind == "standard":
        return h * w * out_channels * kernel * kernel * in_channels
    if kind == "depthwise":
        return h * w * in_channels * multiplier * kernel * kernel
    if kind == "pointwise":
        return _out_size(height, 1, stride, padding) * _out_size(width, 1, stride, padding) * \
            in_channels * out_channels
    if kind == "separable":
        return h * w * in_channels * kernel * kernel + h * w * in_channels * out_channels
    raise ValueError(f"unknown conv kind {kind!r}; choose one of {CONV_KINDS}")


def conv_parameters(kind: str, in_channels: int, out_channels: int, kernel: int, *,
                    bias: bool = False, multiplier: int = 1) -> int:
    """Parameters of one convolution layer: standard N M K^2 (+N), separable M K^2 + N M (+M+N)."""
    if kind == "standard":
        return out_channels * in_channels * kernel * kernel + (out_channels if bias else 0)
    if kind == "depthwise":
        n = in_channels * multiplier
        return n * kernel * kernel + (n if bias else 0)
    if kind == "pointwise":
        return in_channels * out_channels + (out_channels if bias else 0)
    if kind == "separable":
        return (in_channels * kernel * kernel + in_channels * out_channels
                + ((in_channels + out_channels) if bias else 0))
    raise ValueError(f"unknown conv kind {kind!r}; choose one of {CONV_KINDS}")


class Conv(nn.Module):
    """One convolution of a given kind on [batch, height, width, channels].

    standard: a full k x k conv to `features`; depthwise: one k x k filter per input channel
    (groups = input channels), `multiplier` outputs each, so `features` is ignored; pointwise:
    1 x 1; separable: depthwise (multiplier 1), then pointwise to `features`.
    """

    kind: str
    features: int
    kernel: int = 3
    strides: int = 1
    multiplier: int = 1
    use_bias: bool = False
    padding: str = "SAME"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s, groups, name: conv2d(  # noqa: E731
            f, (k, k), (s, s), padding=self.padding, feature_group_count=groups,
            use_bias=self.use_bias, dtype=self.dtype, name=name)
        channels = x.shape[-1]
        if self.kind == "standard":
            return conv(self.features, self.kernel, self.strides, 1, "conv")(x)
        if self.kind == "depthwise":
            return conv(channels * self.multiplier, self.kernel, self.strides, channels,
                        "depthwise")(x)
        if self.kind == "pointwise":
            return conv(self.features, 1, self.strides, 1, "pointwise")(x)
        if self.kind == "separable":
            x = conv(channels, self.kernel, self.strides, channels, "depthwise")(x)
            return conv(self.features, 1, 1, 1, "pointwise")(x)
        raise ValueError(f"unknown conv kind {self.kind!r}; choose one of {CONV_KINDS}")


class PReLU(nn.Module):
    """PReLU with one slope per channel (PyTorch's nn.PReLU(C)), initialised at 0.25."""

    slope_init: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = self.param("alpha", nn.initializers.constant(self.slope_init), (x.shape[-1],),
                           jnp.float32)
        return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drops contiguous block_size x block_size regions.

    Seeds are drawn with rate gamma = rate / bs^2 * HW / ((H - bs + 1)(W - bs + 1)) inside the
    region where a whole block fits, grown into blocks by a max-pool, and kept activations are
    rescaled by (all / kept) like dropout. Identity at eval or with rate 0. Needs the "dropout" rng.
    """

    rate: float = 0.1
    block_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        _, h, w, _ = x.shape
        bs = min(self.block_size, h, w)
        gamma = self.rate / (bs * bs) * (h * w) / ((h - bs + 1) * (w - bs + 1))
        seed_shape = (x.shape[0], h - bs + 1, w - bs + 1, x.shape[-1])
        seeds = jax.random.bernoulli(self.make_rng("dropout"), gamma, seed_shape)
        lo, hi = bs // 2, (bs - 1) // 2
        seeds = jnp.pad(seeds.astype(jnp.float32), ((0, 0), (lo, hi), (lo, hi), (0, 0)))
        dropped = nn.max_pool(seeds, (bs, bs), padding="SAME")
        keep = 1.0 - dropped
        scale = keep.size / jnp.maximum(jnp.sum(keep), 1.0)
        return (x * keep * scale).astype(x.dtype)
