"""The XLA:CPU speed path: convolutions and compiler options for a fast train step on CPU.

All the CPU tuning sits together here: `conv_general_dilated`, which the backbones' convs
compute through (layers.conv2d passes it to nn.Conv), and `compiler_options()`, the XLA options
model code is jitted with. `conv_general_dilated` matches `jax.lax.conv_general_dilated` on
flax's NHWC / HWIO layout up to floating-point rounding (it sums the kernel's taps in another
order), gradients included; the measurements behind each rewrite are in benchmarks/README.md,
"Train step".

Off on GPU and TPU: both ask `jax.default_backend()`, the conv each time it is traced and the
options each time they are asked for. On any backend but "cpu" every conv is
lax.conv_general_dilated itself and compiler_options() is None (XLA's defaults). It is the
default backend that decides, not the devices a computation is placed on. On CPU too, only the
convs XLA:CPU is slow at are rewritten (see `conv_general_dilated`); the rest go to
lax.conv_general_dilated unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

# On CPU, YNNPACK keeps the reductions (BatchNorm statistics: fast there) and the convolutions go
# to Eigen: YNNPACK's convolution weight gradients ran 6x slower than its forward pass
# (benchmarks/README.md, "Train step").
_XLA_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict[str, str] | None:
    """XLA options for jitting model code on the default backend; None keeps XLA's defaults."""
    return dict(_XLA_CPU_OPTIONS) if jax.default_backend() == "cpu" else None


# flax's layout, the only one rewritten: input and output NHWC, kernel HWIO.
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


def _strided_conv_fwd(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                      pads: tuple[tuple[int, int], ...], precision: Any
                      ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _lax_conv(x, w, strides, pads, precision), (x, w)


def _strided_conv_bwd(strides: tuple[int, int], pads: tuple[tuple[int, int], ...],
                      precision: Any, residuals: tuple[jax.Array, jax.Array], dy: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
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


def _shifted_conv_fwd(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                      pads: tuple[tuple[int, int], ...]
                      ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    kh, kw, shifts, channels = w.shape
    xp, _ = _shifted_input(x, w, pads)
    out = _out_positions(xp.shape[1:3], w.shape[:2], strides)
    y = sum(_window(xp, (i, j, d), (*out, channels), strides) * w[i, j, d]
            for i in range(kh) for j in range(kw) for d in range(shifts))
    return y, (x, w)


def _shifted_conv_bwd(strides: tuple[int, int], pads: tuple[tuple[int, int], ...],
                      residuals: tuple[jax.Array, jax.Array], dy: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
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
