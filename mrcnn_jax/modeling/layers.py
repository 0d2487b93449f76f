"""Small building blocks shared by the backbone and the heads: norms, convolutions with torch-compatible padding."""

from __future__ import annotations

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


def conv(features: int, kernel: int, *, stride: int = 1, use_bias: bool = True, name: str, dtype=jnp.float32):
  """A 2-D NHWC convolution padded like torch's Conv2d(kernel, stride, padding=kernel // 2)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def conv_transpose(features: int, kernel: int, stride: int, padding: int, *, name: str, dtype=jnp.float32):
  """torch's ConvTranspose2d(kernel, stride, padding) in NHWC.

  The kernel is stored (kh, kw, in, out) and applied as a plain (not transposed) kernel: a torch weight w of shape
  (in, out, kh, kw) converts as w.transpose(2, 3, 0, 1)[::-1, ::-1] (see convert/torchvision.py).
  """
  pad = kernel - 1 - padding
  return nn.ConvTranspose(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                          dtype=dtype, param_dtype=jnp.float32, name=name)


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
