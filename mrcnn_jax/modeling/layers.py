"""The layers the backbone and the heads are built of: norms, convolutions padded like torch's, dense layers.

Each convolution layer runs one op of `mrcnn_jax.cpu.conv` (`conv2d`, `pointwise`, `conv_transpose`): XLA's
convolution and dot on GPU and TPU, with faster forms where the program runs on CPU (see `mrcnn_jax.cpu`;
MRCNN_JAX_CPU_KERNELS=0 runs XLA's ops there too).

Mixed precision (`model.compute_dtype = "bfloat16"`): parameters are float32 and cast to the compute dtype where
they are used, so their gradients come back float32. Norm statistics, and FrozenBN's folded scale and bias, are
computed in float32 (flax's BatchNorm and GroupNorm reduce in float32). A bias's gradient is the sum of the output's
gradient over every pixel (and RoI) of the batch, hundreds of thousands of terms: `add_bias` sums it in float32,
where JAX's own transpose of the broadcast would sum in bfloat16 (8 bits of mantissa).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from mrcnn_jax.cpu import conv as conv_ops

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


@jax.custom_vjp
def add_bias(y, bias):
  """y (..., C) + bias (C,) in y's dtype; the bias's gradient summed in float32 and returned in bias's dtype."""
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  d_bias = jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=jnp.float32)  # accumulated in float32 inside the reduce
  return g, d_bias.astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nn.Module):
  """flax nn.Dense over the last axis (its parameters, `kernel` (in, out) and `bias` (out,), and initializers, so
  checkpoints and converters see the same tree), computed in `dtype` with the bias added by `add_bias`."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    y = lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
    return add_bias(y, bias)


def make_norm(kind: str, *, train: bool, eps: float, name: str, dtype=jnp.float32) -> nn.Module:
  """The norm layer named by a config: "FrozenBN", "BN" (statistics in `batch_stats`) or "GN" (32 groups)."""
  if kind == "FrozenBN":
    return FrozenBatchNorm(eps=eps, name=name)
  if kind == "BN":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=eps, dtype=dtype, name=name)
  if kind == "GN":
    return nn.GroupNorm(num_groups=32, epsilon=eps, dtype=dtype, name=name)
  raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


class Conv(nn.Module):
  """A 2-D NHWC convolution padded like torch's Conv2d(kernel, stride, padding=kernel // 2).

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
      y = conv_ops.pointwise(x[:, ::self.stride, ::self.stride], kernel[0, 0])
    else:
      y = conv_ops.conv2d(x, kernel, self.stride, k // 2)
    if self.use_bias:
      y = add_bias(y, self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32))
    return y


def conv(features: int, kernel: int, *, stride: int = 1, use_bias: bool = True, name: str, dtype=jnp.float32):
  """A 2-D NHWC convolution padded like torch's Conv2d(kernel, stride, padding=kernel // 2) (see `Conv`)."""
  return Conv(features, kernel, stride, use_bias, dtype=dtype, name=name)


class ConvTranspose(nn.Module):
  """torch's ConvTranspose2d(kernel, stride, padding) on NHWC (through `conv_ops.conv_transpose`).

  Parameters are flax ConvTranspose's: `kernel` (kh, kw, in, out), stored spatially flipped (a torch weight w of
  shape (in, out, kh, kw) converts as w.transpose(2, 3, 0, 1)[::-1, ::-1], see convert/common.py), and `bias`.
  """

  features: int
  kernel_size: int
  stride: int
  padding: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    y = conv_ops.conv_transpose(x.astype(self.dtype), kernel, self.stride, self.padding)
    return add_bias(y, bias)


def conv_transpose(features: int, kernel: int, stride: int, padding: int, *, name: str, dtype=jnp.float32):
  """torch's ConvTranspose2d(kernel, stride, padding) in NHWC (see `ConvTranspose`)."""
  return ConvTranspose(features, kernel, stride, padding, dtype=dtype, name=name)


def roi_conv_tower(x, num_convs: int, conv_dim: int, *, dtype=jnp.float32):
  """The trunk of the mask and keypoint heads: (B, R, S, S, C) RoI features -> (B * R, S, S, conv_dim), the RoIs
  flattened into one batch and put through `num_convs` 3x3 convs with ReLU, named conv1, conv2, ... in the calling
  module (call it from a compact method; C channels out when num_convs is 0)."""
  b, r = x.shape[:2]
  x = x.reshape((b * r,) + x.shape[2:]).astype(dtype)
  for i in range(num_convs):
    x = nn.relu(conv(conv_dim, 3, name=f"conv{i + 1}", dtype=dtype)(x))
  return x


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
