"""Small building blocks shared by the backbone and the heads: norms, convolutions with torch-compatible padding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

NORMS = ("FrozenBN", "BN", "GN")


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine (Detectron2's FrozenBatchNorm2d, torchvision's FrozenBatchNorm2d).

  All four arrays live in the `batch_stats` collection, not in `params`: they are constants of a pretrained model and
  no optimizer should touch them. y = x * scale' + bias' with scale' = scale / sqrt(var + eps),
  bias' = bias - mean * scale', computed in float32 (the arithmetic of both reference implementations).
  """

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.variable("batch_stats", "scale", lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)).value
    s = scale * lax.rsqrt(var + self.eps)
    b = bias - mean * s
    return x * s.astype(x.dtype) + b.astype(x.dtype)


def make_norm(kind: str, *, train: bool, eps: float, name: str, dtype=jnp.float32) -> nn.Module:
  """The norm layer named by a config: "FrozenBN", "BN" (statistics in `batch_stats`) or "GN" (32 groups)."""
  if kind == "FrozenBN":
    return FrozenBatchNorm(eps=eps, name=name)
  if kind == "BN":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=eps, dtype=dtype, name=name)
  if kind == "GN":
    return nn.GroupNorm(num_groups=32, epsilon=eps, dtype=dtype, name=name)
  raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


_DIMENSIONS = ("NHWC", "HWIO", "NHWC")

# On CPU, kernel gradients are computed tap by tap (see `conv2d`); tests turn this off to check XLA's own path.
_TAPWISE_KERNEL_GRAD_ON_CPU = True
# On CPU, 3x3 stride-1 convolutions and their gradients use Winograd's F(2x2, 3x3) (see `_conv3x3_winograd`).
_WINOGRAD_ON_CPU = True


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


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
# each 2x2 block of outputs is A^T [(G k G^T) * (B^T d B)] A for the 4x4 input tile d under it, so a 3x3 convolution
# becomes 16 independent (tiles, C) x (C, O) matmuls: 4 multiplies per output pixel and channel pair instead of 9.
# B^T's entries are 0 and +-1 and G's 0, +-1/2 and 1, so the transforms are exact additions and halvings.
def _winograd_tiles_1d(x, axis: int, tiles: int):
  """B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]] applied along `axis` to the 4-long windows at
  stride 2 of x (which holds 2 * tiles + 2 entries on that axis): four arrays with `tiles` entries there.

  Window t holds d_a = x[2t + a]: d_0 and d_2 are the even entries t and t + 1, d_1 and d_3 the odd ones, so each
  row of B^T is an add of two shifted slices; XLA fuses them and transposes them into pads and adds."""
  even = lax.slice_in_dim(x, 0, 2 * tiles + 2, 2, axis)
  odd = lax.slice_in_dim(x, 1, 2 * tiles + 2, 2, axis)
  d0, d2 = lax.slice_in_dim(even, 0, tiles, 1, axis), lax.slice_in_dim(even, 1, tiles + 1, 1, axis)
  d1, d3 = lax.slice_in_dim(odd, 0, tiles, 1, axis), lax.slice_in_dim(odd, 1, tiles + 1, 1, axis)
  return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _winograd_tile_grid(h: int, w: int, padding: int):
  """Output size (Ho, Wo) of a 3x3 stride-1 convolution and the (Th, Tw) 2x2 output tiles that cover it."""
  ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
  return ho, wo, -(-ho // 2), -(-wo // 2)


def _winograd_input(x, padding: int):
  """x (N, H, W, C) zero-padded, in 4x4 tiles at stride 2, each transformed to B^T d B: (16, N * Th * Tw, C)."""
  n, h, w, c = x.shape
  _, _, th, tw = _winograd_tile_grid(h, w, padding)
  # Pad to exactly 2 * Th + 2 rows and 2 * Tw + 2 columns; the extra bottom/right zeros only feed outputs past
  # (Ho, Wo), which `_winograd_output` drops.
  xp = jnp.pad(x, ((0, 0), (padding, 2 * th + 2 - h - padding), (padding, 2 * tw + 2 - w - padding), (0, 0)))
  rows = _winograd_tiles_1d(xp, 1, th)
  v = jnp.stack([t for r in rows for t in _winograd_tiles_1d(r, 2, tw)])
  return v.reshape(16, n * th * tw, c)


def _winograd_kernel_1d(k0, k1, k2):
  """G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]] applied to three taps."""
  return [k0, 0.5 * (k0 + k1 + k2), 0.5 * (k0 - k1 + k2), k2]


def _winograd_kernel(kernel):
  """G k G^T of a (3, 3, C, O) kernel: (16, C, O). Written out as adds, which XLA fuses into one pass (as an
  einsum with G it costs a few ms of small matmuls per layer)."""
  rows = _winograd_kernel_1d(kernel[0], kernel[1], kernel[2])
  return jnp.stack([t for r in rows for t in _winograd_kernel_1d(r[0], r[1], r[2])])


def _winograd_kernel_transpose(du):
  """The transpose of `_winograd_kernel`: dU (16, C, O) -> dk = G^T dU G (3, 3, C, O)."""
  def gather(u0, u1, u2, u3):  # G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]]
    return [u0 + 0.5 * (u1 + u2), 0.5 * (u1 - u2), u3 + 0.5 * (u1 + u2)]

  du = du.reshape(4, 4, *du.shape[1:])
  cols = [gather(du[a, 0], du[a, 1], du[a, 2], du[a, 3]) for a in range(4)]  # [a][x]
  return jnp.stack([jnp.stack(gather(*(cols[a][x] for a in range(4)))) for x in range(3)], axis=1)


def _winograd_output(m, n: int, h: int, w: int, padding: int):
  """A^T M A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] for M (16, N * Th * Tw, O): the (N, Ho, Wo, O) outputs."""
  ho, wo, th, tw = _winograd_tile_grid(h, w, padding)
  m = m.reshape(4, 4, n, th, tw, m.shape[-1])
  rows = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])
  y = jnp.stack([jnp.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], axis=3) for r in rows], axis=2)
  return y.reshape(n, 2 * th, 2 * tw, -1)[:, :ho, :wo]  # (N, Th, 2, Tw, 2, O): tile rows and columns interleaved


def _winograd_output_transpose(dy, padding: int, h: int, w: int):
  """The transpose of `_winograd_output`: dy (N, Ho, Wo, O) -> dM (16, N * Th * Tw, O), dM = A dY A^T per tile."""
  n, ho, wo, o = dy.shape
  _, _, th, tw = _winograd_tile_grid(h, w, padding)
  dy = jnp.pad(dy, ((0, 0), (0, 2 * th - ho), (0, 2 * tw - wo), (0, 0))).reshape(n, th, 2, tw, 2, o)

  def spread(d0, d1):  # A = [[1, 0], [1, 1], [1, -1], [0, -1]] applied to the pair (d0, d1)
    return [d0, d0 + d1, d0 - d1, -d1]

  rows = spread(dy[:, :, 0], dy[:, :, 1])  # each (N, Th, Tw, 2, O)
  dm = jnp.stack([t for r in rows for t in spread(r[:, :, :, 0], r[:, :, :, 1])])
  return dm.reshape(16, n * th * tw, o)


def _conv3x3_winograd(x, kernel, padding: int):
  """A 3x3 stride-1 convolution (NHWC x HWIO, symmetric zero padding) by Winograd's F(2x2, 3x3)."""
  n, h, w, _ = x.shape
  m = lax.dot_general(_winograd_input(x, padding), _winograd_kernel(kernel), (((2,), (1,)), ((0,), (0,))),
                      preferred_element_type=jnp.float32)
  return _winograd_output(m, n, h, w, padding).astype(x.dtype)


def _kernel_grad_winograd(x, dy, padding: int):
  """d loss / d kernel of `_conv3x3_winograd`: dU = V^T dM per tile position (16 matmuls over the tiles, 4
  multiplies per pixel and channel pair instead of the 9 of the per-tap form), then dk = G^T dU G."""
  _, h, w, _ = x.shape
  v = _winograd_input(x, padding)
  dm = _winograd_output_transpose(dy, padding, h, w)
  # As in `_pointwise_kernel_grad_cpu`: dM transposed once from memory, then standard-form matmuls.
  dm_t = jnp.swapaxes(lax.optimization_barrier(dm), 1, 2)
  du = jnp.matmul(dm_t, v, preferred_element_type=jnp.float32)  # (16, O, C)
  return _winograd_kernel_transpose(jnp.swapaxes(du, 1, 2)).astype(dy.dtype)


def _materialize_on_cpu(x):
  """x itself; on CPU kept whole in memory rather than recomputed by whichever consumer XLA fuses it into.

  Why: the activation a layer saves for its backward pass is the output of a cheap elementwise chain (norm, residual
  add, ReLU). XLA:CPU fuses that chain into each consumer, and when a consumer wants the activation in another
  layout (a matmul over the pixels), it recomputes the chain through several residual blocks with strided reads.
  Other backends fuse producers into their matmuls profitably, so there it is a no-op.
  """
  return lax.platform_dependent(x, cpu=lax.optimization_barrier, default=lambda x: x)


@jax.custom_vjp
def pointwise(x, kernel):
  """y[..., o] = sum_c x[..., c] kernel[c, o]: a 1x1 convolution (or any matmul over the last axis).

  Why a custom VJP: the kernel gradient is a matmul over the pixels, x^T dy. JAX's transpose of the einsum leaves
  XLA:CPU to transpose x (or dy) inside a fusion that recomputes it (see `_materialize_on_cpu`); here, on CPU, dy
  is transposed once from memory and the matmul is dy^T x. With `_materialize_on_cpu` on the inputs of this and of
  `conv2d`, the R50-FPN train step (512x512, batch 2, two CPU cores) went from about 5.0 s to 4.4 s. Same values on
  every backend.
  """
  return jnp.einsum("...c,co->...o", x, kernel)


def _pointwise_fwd(x, kernel):
  x = _materialize_on_cpu(x)
  return pointwise(x, kernel), (x, kernel)


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


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, stride: int, padding: int):
  """A 2-D convolution, NHWC x HWIO -> NHWC, symmetric zero padding, with CPU-friendly gradients.

  Why a custom VJP: XLA:CPU computes the kernel gradient of a convolution as another convolution whose "batch" is
  the input channels and whose window is the whole output map. For wide layers over many pixels (the mask head's
  3x3 convs on 256 RoIs of 14x14, FPN's P2 output conv) that ran 2-7x slower than the kh*kw matmuls it amounts to.
  Inside a conditional (the foreground switch of `MaskRCNN.losses`) XLA:CPU leaves such gradient convolutions in a
  generic form that is slower still: 3.7 s instead of 22 ms for one mask-head conv on 16 RoIs, and 109 ms instead
  of 21 ms for its input gradient. So on CPU the kernel gradient is one matmul per tap, and the input gradient of a
  stride-1 convolution is written as the forward convolution it is (flipped kernel), which XLA:CPU runs fast
  everywhere. Other backends, and strided input gradients, keep XLA's.
  """
  return _conv_fast_on_cpu(x, kernel, stride, padding)


def _winograd_applies(x_shape, kernel_shape, stride: int, padding: int) -> bool:
  """Whether a convolution runs by Winograd's F(2x2, 3x3) on CPU: 3x3, stride 1, and enough work to pay for the
  transforms. Measured on two cores, forward and backward: 2x128x128x256 (FPN's P2) 0.6x the time, 16x14x14x256 (the
  mask head) 0.6x, 2x32x32x256 0.8x; but 2x16x16x512 (res5) 1.6x and 2x128x128x64 (res2) 1.1x."""
  if not (_WINOGRAD_ON_CPU and stride == 1 and tuple(kernel_shape[:2]) == (3, 3)):
    return False
  n, h, w, _ = x_shape
  _, _, th, tw = _winograd_tile_grid(h, w, padding)
  return n * th * tw >= 512 and min(kernel_shape[2:]) >= 128


def _conv_fast_on_cpu(x, kernel, stride: int, padding: int):
  """`_conv`, by Winograd's F(2x2, 3x3) on CPU where it applies (see `_winograd_applies`)."""
  if not _winograd_applies(x.shape, kernel.shape, stride, padding):
    return _conv(x, kernel, stride, padding)
  return lax.platform_dependent(x, kernel, cpu=functools.partial(_conv3x3_winograd, padding=padding),
                                default=functools.partial(_conv, stride=stride, padding=padding))


def _conv2d_fwd(x, kernel, stride, padding):
  x = _materialize_on_cpu(x)
  return _conv_fast_on_cpu(x, kernel, stride, padding), (x, kernel)


def _input_grad_as_conv(x, dy, kernel, padding: int):
  """d loss / d x of a stride-1 convolution as a forward convolution: dy convolved with the kernel flipped in space,
  its in/out channels swapped, padded by k - 1 - padding. x is only for the platform switch's uniform signature."""
  del x
  kh = kernel.shape[0]
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  if _winograd_applies(dy.shape, flipped.shape, 1, kh - 1 - padding):
    return _conv3x3_winograd(dy, flipped, kh - 1 - padding)
  return _conv(dy, flipped, 1, kh - 1 - padding)


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

  if _winograd_applies(x.shape, kernel.shape, stride, padding):
    winograd = functools.partial(_kernel_grad_winograd, padding=padding)
    dk = lax.platform_dependent(x, dy, cpu=winograd, default=xla_kernel_grad)
  elif _TAPWISE_KERNEL_GRAD_ON_CPU:
    tapwise = functools.partial(_kernel_grad_tapwise, kernel_shape=kernel.shape, stride=stride, padding=padding)
    dk = lax.platform_dependent(x, dy, cpu=tapwise, default=xla_kernel_grad)
  else:
    dk = xla_kernel_grad(x, dy)
  return dx, dk


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """A 2-D NHWC convolution padded like torch's Conv2d(kernel, stride, padding=kernel // 2), through `conv2d`.

  Parameters are flax nn.Conv's (`kernel` (k, k, in, out), `bias` (out,)) with its initializers, so checkpoints and
  converters see the same tree.
  """

  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1:
      # A 1x1 convolution is a matmul over channels; as a dot, XLA:CPU runs it (and its gradients) several times
      # faster than as a convolution (the mask predictor on 256 RoIs of 28x28: 0.76 s forward as a convolution).
      y = pointwise(x[:, ::self.stride, ::self.stride], kernel[0, 0])
    else:
      y = conv2d(x, kernel, self.stride, k // 2)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32).astype(self.dtype)
    return y


def conv(features: int, kernel: int, *, stride: int = 1, use_bias: bool = True, name: str, dtype=jnp.float32):
  """A 2-D NHWC convolution padded like torch's Conv2d(kernel, stride, padding=kernel // 2) (see `Conv`)."""
  return Conv(features, kernel, stride, use_bias, dtype=dtype, name=name)


class ConvTranspose(nn.Module):
  """torch's ConvTranspose2d(kernel, stride, padding) on NHWC, written as one matmul and a few pads.

  Parameters are flax ConvTranspose's: `kernel` (kh, kw, in, out), stored spatially flipped (a torch weight w of
  shape (in, out, kh, kw) converts as w.transpose(2, 3, 0, 1)[::-1, ::-1], see convert/common.py), and `bias`.

  Why not lax.conv_transpose: XLA:CPU differentiates an input-dilated convolution with a generic loop; the mask
  head's 2x2 deconvolution took 9.8 s of backward for 0.2 s of forward (128 RoIs, 256 channels). As a matmul,
  torch's definition y[s*i - p + a] += x[i] w[a] has only matmul and pad transposes:
    z[i, a] = x[i] @ w[a] for every tap a, then each tap a = s*q + r adds z[i, a] at output s*(i + q) + r - p,
  i.e. phase r of block i + q: a shift by q, an add, and an interleave of the s phases.
  """

  features: int
  kernel_size: int
  stride: int
  padding: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, p = self.kernel_size, self.stride, self.padding
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    n, h, w, _ = x.shape
    q = -(-k // s)  # blocks a kernel spans
    w_torch = kernel[::-1, ::-1].astype(self.dtype)
    w_torch = jnp.pad(w_torch, ((0, q * s - k), (0, q * s - k), (0, 0), (0, 0)))  # zero taps up to q*s
    c = x.shape[-1]
    z = pointwise(x.astype(self.dtype), w_torch.transpose(2, 0, 1, 3).reshape(c, -1))  # (n, h, w, a * b * o)
    z = z.reshape(n, h, w, q, s, q, s, self.features)  # tap a = (q, r)
    y = 0
    for qy in range(q):
      for qx in range(q):
        tap = z[:, :, :, qy, :, qx, :, :]  # (n, h, w, s, s, o): phase (ry, rx) of block (i + qy, j + qx)
        tap = jnp.pad(tap, ((0, 0), (qy, q - 1 - qy), (qx, q - 1 - qx), (0, 0), (0, 0), (0, 0)))
        y = y + tap
    # (n, H', W', ry, rx, o) -> (n, H' * s, W' * s, o), then torch's output window [p, p + (h - 1) s + k - 2p).
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h + q - 1) * s, (w + q - 1) * s, self.features)
    out_h, out_w = (h - 1) * s + k - 2 * p, (w - 1) * s + k - 2 * p
    return y[:, p:p + out_h, p:p + out_w] + bias.astype(self.dtype)


def conv_transpose(features: int, kernel: int, stride: int, padding: int, *, name: str, dtype=jnp.float32):
  """torch's ConvTranspose2d(kernel, stride, padding) in NHWC (see `ConvTranspose`)."""
  return ConvTranspose(features, kernel, stride, padding, dtype=dtype, name=name)


def max_pool(x, kernel: int, stride: int, padding: int):
  """torch's max_pool2d on NHWC (padding reads -inf)."""
  return nn.max_pool(x, (kernel, kernel), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


def upsample_nearest(x, size_hw):
  """torch's F.interpolate(mode="nearest") to (h, w): source index floor(dst * in / out). x: (B, H, W, C)."""
  h, w = x.shape[1:3]
  out_h, out_w = size_hw
  if out_h % h == 0 and out_w % w == 0:  # the FPN case (exact 2x): a repeat, no gather
    return jnp.repeat(jnp.repeat(x, out_h // h, axis=1), out_w // w, axis=2)
  ys = (jnp.arange(out_h) * (h / out_h)).astype(jnp.int32)
  xs = (jnp.arange(out_w) * (w / out_w)).astype(jnp.int32)
  return x[:, ys][:, :, xs]
