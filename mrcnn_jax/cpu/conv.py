"""The convolution ops of the model's layers: `conv2d`, `pointwise` and `conv_transpose`, NHWC, with CPU forms.

Each op is XLA's (`lax.conv_general_dilated`, `jnp.einsum`, an input-dilated convolution) when the CPU kernels are
switched off (`mrcnn_jax.cpu.kernels_enabled`, MRCNN_JAX_CPU_KERNELS=0). Otherwise `conv2d` and `pointwise` are
custom VJPs whose CPU branches (`lax.platform_dependent`, chosen when the program is lowered, so one exported module
serves every platform) hold the forms below and whose other branches are XLA's, and `conv_transpose` is written as
a `pointwise` matmul on every backend. Why each, with measurements: the package docstring.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from mrcnn_jax import cpu
from mrcnn_jax.cpu import winograd

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv2d(x, kernel, stride: int, padding: int):
  """A 2-D convolution, (N, H, W, C) x (kh, kw, C, O) -> (N, Ho, Wo, O), symmetric zero padding.

  XLA's convolution on GPU and TPU; on CPU `_conv2d`'s forms, unless the CPU kernels are switched off.
  """
  if not cpu.kernels_enabled():
    return _conv(x, kernel, stride, padding)
  return _conv2d(x, kernel, stride, padding)


def pointwise(x, kernel):
  """y[..., o] = sum_c x[..., c] kernel[c, o]: a 1x1 convolution (or any matmul over the last axis). x: (..., C),
  kernel: (C, O) -> (..., O). With the CPU kernels on, `_pointwise`'s gradients."""
  if not cpu.kernels_enabled():
    return jnp.einsum("...c,co->...o", x, kernel)
  return _pointwise(x, kernel)


def conv_transpose(x, kernel, stride: int, padding: int):
  """torch's ConvTranspose2d(k, stride, padding) without bias: (N, H, W, C) -> (N, (H - 1) s + k - 2p, ..., O).

  kernel: (k, k, C, O), flax's ConvTranspose layout, i.e. torch's weight (C, O, k, k) transposed and flipped in space
  (see convert/common.py), cast to x's dtype. With the CPU kernels switched off, XLA's input-dilated convolution
  (what `lax.conv_transpose` lowers to); otherwise, on every backend, one matmul and a few pads
  (`_conv_transpose_matmul`).
  """
  if not cpu.kernels_enabled():
    k = kernel.shape[0]
    pads = ((k - 1 - padding, k - 1 - padding),) * 2
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), pads, lhs_dilation=(stride, stride),
                                    dimension_numbers=_DIMENSIONS)
  return _conv_transpose_matmul(x, kernel, stride, padding)


# ---------------------------------------------------------------------------------------------------------------------
# The CPU forms.
# ---------------------------------------------------------------------------------------------------------------------


def _conv(x, kernel, stride: int, padding: int):
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                  dimension_numbers=_DIMENSIONS)


def _kernel_grad_tapwise(x, dy, kernel_shape, stride: int, padding: int):
  """d loss / d kernel as one matmul per kernel tap: dk[ky, kx] = sum_{n,i,j} x[n, s*i + ky - p, s*j + kx - p]^T
  dy[n, i, j]. x: (N, H, W, C), dy: (N, Ho, Wo, O) -> (kh, kw, C, O)."""
  kh, kw = kernel_shape[:2]
  n, h, w, c = x.shape
  _, ho, wo, o = dy.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  if stride == 1:
    # Each image's padded grid flattened to rows q = (i, j): tap (ky, kx) pairs x row q + ky * Wp + kx with dy row q
    # (dy zero outside its Ho x Wo output). With dy shifted down by kx rows, kw copies side by side, one matmul per
    # kernel row ky over a contiguous block of x rows gives all kw taps of that row: kh + kw copies instead of
    # kh * kw strided windows, and kh wide matmuls instead of kh * kw narrow ones. The batch axis stays apart, so
    # a batch sharded over devices needs no data from its neighbours.
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = hp * wp - (kh - 1) * wp
    xf = xp.reshape(n, hp * wp, c)
    dyf = jnp.pad(dy, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(n, hp * wp, o)[:, :rows - (kw - 1)]
    shifted = jnp.concatenate([jnp.pad(dyf, ((0, 0), (kx, kw - 1 - kx), (0, 0))) for kx in range(kw)], axis=2)
    shifted = shifted.reshape(n * rows, kw * o)
    # 2-D matmuls over (image, row) pairs: XLA:CPU runs them faster than one contracting two axes.
    taps = [lax.dot_general(xf[:, ky * wp:ky * wp + rows].reshape(n * rows, c), shifted, (((0,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32).reshape(c, kw, o) for ky in range(kh)]
    return jnp.stack(taps).transpose(0, 2, 1, 3).astype(dy.dtype)  # (kh, C, kw, O) -> (kh, kw, C, O)
  taps = []
  for ky in range(kh):
    for kx in range(kw):
      xs = lax.slice(xp, (0, ky, kx, 0), (n, ky + stride * (ho - 1) + 1, kx + stride * (wo - 1) + 1, c),
                     (1, stride, stride, 1))
      taps.append(jnp.einsum("nhwc,nhwo->co", xs, dy, preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kernel_shape).astype(dy.dtype)


def _materialize_on_cpu(x):
  """x itself; on CPU kept whole in memory rather than recomputed by whichever consumer XLA fuses it into.

  Why: the activation a layer saves for its backward pass is the output of a cheap elementwise chain (norm, residual
  add, ReLU). XLA:CPU fuses that chain into each consumer, and when a consumer wants the activation in another
  layout (a matmul over the pixels), it recomputes the chain through several residual blocks with strided reads.
  Other backends fuse producers into their matmuls profitably, so there it is a no-op.
  """
  return lax.platform_dependent(x, cpu=lax.optimization_barrier, default=lambda x: x)


@jax.custom_vjp
def _pointwise(x, kernel):
  """`pointwise` with its own VJP.

  Why: the kernel gradient is a matmul over the pixels, x^T dy. JAX's transpose of the einsum leaves XLA:CPU to
  transpose x (or dy) inside a fusion that recomputes it (see `_materialize_on_cpu`); here, on CPU, dy is transposed
  once from memory and the matmul is dy^T x. With `_materialize_on_cpu` on the inputs of this and of `_conv2d`, the
  R50-FPN train step (512x512, batch 2, two CPU cores) went from about 5.0 s to 4.4 s. Same values on every backend.
  """
  return jnp.einsum("...c,co->...o", x, kernel)


def _pointwise_fwd(x, kernel):
  x = _materialize_on_cpu(x)
  return _pointwise(x, kernel), (x, kernel)


def _pointwise_kernel_grad_cpu(x2, dy2):
  dy_t = jnp.transpose(lax.optimization_barrier(dy2))
  return jnp.matmul(dy_t, x2, preferred_element_type=jnp.float32).T


def _pointwise_kernel_grad(x2, dy2):
  return lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _pointwise_bwd(residuals, dy):
  x, kernel = residuals
  dx = jnp.einsum("...o,co->...c", dy, kernel).astype(x.dtype)
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dk = lax.platform_dependent(x2, dy2, cpu=_pointwise_kernel_grad_cpu, default=_pointwise_kernel_grad)
  return dx, dk.astype(kernel.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, kernel, stride: int, padding: int):
  """`conv2d` with CPU-friendly forward and gradients.

  Why a custom VJP: XLA:CPU computes the kernel gradient of a convolution as another convolution whose "batch" is
  the input channels and whose window is the whole output map. For wide layers over many pixels (the mask head's
  3x3 convs on 256 RoIs of 14x14, FPN's P2 output conv) that ran 2-7x slower than the kh*kw matmuls it amounts to.
  Inside a conditional (the foreground switch of `MaskRCNN.losses`) XLA:CPU leaves such gradient convolutions in a
  generic form that is slower still: 3.7 s instead of 22 ms for one mask-head conv on 16 RoIs, and 109 ms instead
  of 21 ms for its input gradient. So on CPU the kernel gradient is one matmul per tap, and the input gradient of a
  stride-1 convolution is written as the forward convolution it is (flipped kernel), which XLA:CPU runs fast
  everywhere. Other backends, and strided input gradients, keep XLA's.

  On CPU, large 3x3 stride-1 layers run by Winograd's minimal filtering instead (`winograd`), the forward where
  `FORWARD` says it pays and the input and kernel gradients where `BACKWARD` does (see `_winograd_for`): XLA:CPU has
  no Winograd of its own, and the R50-FPN train step (batch 2, two cores) went from 4.45 s to 3.38 s at 512x512 and
  from 14.8 s to 10.7 s at 800x1344. The forward alone pays on smaller and thinner layers than forward and backward
  together (res5 and res2 of R50 at 800x1088), which is what inference runs.
  """
  return _conv_fast_on_cpu(x, kernel, stride, padding)


@dataclasses.dataclass(frozen=True)
class WinogradRule:
  """Where Winograd runs on CPU, as thresholds on a float32 3x3 stride-1 layer: at least `min_channels` in and out,
  F(2x2, 3x3) from `f2_pixels` output pixels (N * Ho * Wo); F(4x4, 3x3) from `f4_pixels` on maps of at least
  `f4_min_side` on both sides and at least `f4_min_channels`. Smaller work keeps XLA's convolution, whose
  transforms-free form is then faster."""

  min_channels: int
  f2_pixels: int
  f4_pixels: int
  f4_min_channels: int = 128
  f4_min_side: int = 32


# The forward convolution alone (inference, and a train step's forward), two cores, against XLA's convolution:
# res5 at 800x1088 (1x25x34x512) F2 0.76x the time, 2x16x16x512 F2 0.64x, 1x16x16x512 F2 0.83x, and 1x13x17x512
# even (so F2 from 512 pixels); res2 (64 channels, 1x200x272x64) F2 0.79x, 2x128x128x64 F2 0.82x (so from 64
# channels); the mask head (200x14x14x256) F2 0.58x. F4 would be faster still on res2 (0.61x) and res4 at 800x1088
# (1x50x68x256: 0.47x against F2's 0.55x), but it is ten times less accurate than F2, and with it on those layers
# too a converted Keypoint R-CNN moved one keypoint of 3400 to another peak of a near-tied heatmap (6.6 px) against
# torchvision (tests/modeling/test_parity_torchvision.py, 500x375): F4 stays where the gradients' rule has it.
# These were measured with XLA:CPU's default YNNPACK matmuls (as a train step's forward runs). With XLA's own, which
# the Predictor's inference uses (`compiler`), res2 at batch 2 (2x200x272x64) measured F2 99 ms against XLA's 77
# (1x200x272x64: 42 against 41): the 64-channel threshold may not pay for inference. In the whole batch-2 program
# (both rules compiled in one process, 6 interleaved runs) 128 channels measured within the noise (9400 against
# 8940 ms), so it stays: it also sets the training forward's rounding (the main job's AP).
FORWARD = WinogradRule(min_channels=64, f2_pixels=512, f4_pixels=8192)
# The gradients (the input gradient as a convolution, and the kernel gradient's matmuls over transformed tiles),
# measured forward and backward together: below 2048 pixels the transforms cost more than they save (2x16x16x512,
# res5: 1.6x) and so they do at 64 channels (2x128x128x64, res2: 1.1x); 2x200x336x256 (FPN's P2 at 800x1344) F4
# 0.43x, F2 0.57x; 2x64x64x256 F4 0.45x, F2 0.57x; 2x32x32x256 F2 0.66x, F4 0.75x; the mask head (16x14x14x256) F2
# 0.60x, F4 0.71x.
BACKWARD = WinogradRule(min_channels=128, f2_pixels=2048, f4_pixels=8192)


def _winograd_for(x, kernel, stride: int, padding: int, rule: WinogradRule = FORWARD) -> winograd.Transform | None:
  """The Winograd transform a convolution of x by kernel (arrays or shape-dtype structs) runs by on CPU under `rule`
  (`FORWARD` for the forward convolution, `BACKWARD` for the gradients), or None for XLA's convolution. Only
  float32 3x3 stride-1 layers: in bfloat16 the transforms would round at every add. On small maps F(4x4, 3x3)
  computes many outputs past the edge (16x16 for the mask head's 14x14) and is no faster than F(2x2, 3x3), which is
  also more accurate and quicker to compile."""
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or stride != 1:
    return None
  channels = min(kernel.shape[2:])
  if tuple(kernel.shape[:2]) != (3, 3) or channels < rule.min_channels:
    return None
  n, h, w, _ = x.shape
  ho, wo = winograd.output_size(h, w, padding)
  if n * ho * wo < rule.f2_pixels:
    return None
  f4 = n * ho * wo >= rule.f4_pixels and min(ho, wo) >= rule.f4_min_side and channels >= rule.f4_min_channels
  return winograd.F4 if f4 else winograd.F2


def _conv_cpu(x, kernel, stride: int, padding: int, rule: WinogradRule = FORWARD):
  """`_conv` as it runs on CPU: by Winograd's minimal filtering where `rule` says it pays (see `_winograd_for`)."""
  t = _winograd_for(x, kernel, stride, padding, rule)
  return _conv(x, kernel, stride, padding) if t is None else winograd.conv3x3(x, kernel, padding, t)


def _conv_fast_on_cpu(x, kernel, stride: int, padding: int):
  """`_conv`, with `_conv_cpu` on CPU; no platform switch where both are XLA's convolution."""
  if _winograd_for(x, kernel, stride, padding) is None:
    return _conv(x, kernel, stride, padding)
  return lax.platform_dependent(x, kernel, cpu=functools.partial(_conv_cpu, stride=stride, padding=padding),
                                default=functools.partial(_conv, stride=stride, padding=padding))


def _conv2d_fwd(x, kernel, stride, padding):
  x = _materialize_on_cpu(x)
  return _conv_fast_on_cpu(x, kernel, stride, padding), (x, kernel)


def _input_grad_as_conv(x, dy, kernel, padding: int):
  """d loss / d x of a stride-1 convolution as a forward convolution: dy convolved with the kernel flipped in space,
  its in/out channels swapped, padded by k - 1 - padding. x is only for the platform switch's uniform signature."""
  del x
  kh = kernel.shape[0]
  return _conv_cpu(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), 1, kh - 1 - padding, BACKWARD)


def _conv2d_bwd(stride, padding, residuals, dy):
  x, kernel = residuals

  def xla_input_grad(x, dy):
    _, input_vjp = jax.vjp(lambda x: _conv(x, kernel, stride, padding), x)
    return input_vjp(dy)[0]

  if stride == 1 and kernel.shape[0] == kernel.shape[1] and padding < kernel.shape[0]:
    as_conv = functools.partial(_input_grad_as_conv, kernel=kernel, padding=padding)
    dx = lax.platform_dependent(x, dy, cpu=as_conv, default=xla_input_grad)
  else:
    dx = xla_input_grad(x, dy)

  def xla_kernel_grad(x, dy):
    _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, stride, padding), kernel)
    return kernel_vjp(dy)[0]

  t = _winograd_for(x, kernel, stride, padding, BACKWARD)
  if t is not None:
    by_winograd = functools.partial(winograd.kernel_grad, padding=padding, t=t)
    dk = lax.platform_dependent(x, dy, cpu=by_winograd, default=xla_kernel_grad)
  else:
    tapwise = functools.partial(_kernel_grad_tapwise, kernel_shape=kernel.shape, stride=stride, padding=padding)
    dk = lax.platform_dependent(x, dy, cpu=tapwise, default=xla_kernel_grad)
  return dx, dk


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _conv_transpose_matmul(x, kernel, stride: int, padding: int):
  """`conv_transpose` as one matmul and a few pads.

  Why not lax.conv_transpose: XLA:CPU differentiates an input-dilated convolution with a generic loop; the mask
  head's 2x2 deconvolution took 9.8 s of backward for 0.2 s of forward (128 RoIs, 256 channels). As a matmul,
  torch's definition y[s*i - p + a] += x[i] w[a] has only matmul and pad transposes:
    z[i, a] = x[i] @ w[a] for every tap a, then each tap a = s*q + r adds z[i, a] at output s*(i + q) + r - p,
  i.e. phase r of block i + q: a shift by q, an add, and an interleave of the s phases.
  """
  k, s, p = kernel.shape[0], stride, padding
  n, h, w, c = x.shape
  o = kernel.shape[-1]
  q = -(-k // s)  # blocks a kernel spans
  w_torch = kernel[::-1, ::-1].astype(x.dtype)
  w_torch = jnp.pad(w_torch, ((0, q * s - k), (0, q * s - k), (0, 0), (0, 0)))  # zero taps up to q*s
  z = _pointwise(x, w_torch.transpose(2, 0, 1, 3).reshape(c, -1))  # (n, h, w, a * b * o)
  z = z.reshape(n, h, w, q, s, q, s, o)  # tap a = (q, r)
  y = 0
  for qy in range(q):
    for qx in range(q):
      tap = z[:, :, :, qy, :, qx, :, :]  # (n, h, w, s, s, o): phase (ry, rx) of block (i + qy, j + qx)
      tap = jnp.pad(tap, ((0, 0), (qy, q - 1 - qy), (qx, q - 1 - qx), (0, 0), (0, 0), (0, 0)))
      y = y + tap
  # (n, H', W', ry, rx, o) -> (n, H' * s, W' * s, o), then torch's output window [p, p + (h - 1) s + k - 2p).
  y = y.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h + q - 1) * s, (w + q - 1) * s, o)
  out_h, out_w = (h - 1) * s + k - 2 * p, (w - 1) * s + k - 2 * p
  return y[:, p:p + out_h, p:p + out_w]
