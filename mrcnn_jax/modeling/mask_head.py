"""The mask head of Mask R-CNN: 4 conv 3x3 + 2x deconv + a 1x1 conv with one 28x28 logit map per class."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from mrcnn_jax.cpu import conv as conv_ops
from mrcnn_jax.modeling import layers


class MaskHead(nn.Module):
  """(B, R, 14, 14, C) RoI features -> (B, R, 28, 28, K+1) mask logits, float32 (channel 0: background, unused);
  given each RoI's class, (B, R, 28, 28) logits of that class alone."""

  num_classes: int
  num_convs: int = 4
  conv_dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, classes=None):
    """x (B, R, 14, 14, C) -> (B, R, 28, 28, K+1): the conv tower, a 2x2 stride-2 deconv, one logit map per class.
    With classes (B, R) int: (B, R, 28, 28), each RoI's own class only (inference: the other K maps are never
    read, and computing one costs 1/(K+1) of the predictor)."""
    y = layers.roi_conv_tower(x, self.num_convs, self.conv_dim, dtype=self.dtype)
    y = nn.relu(layers.conv_transpose(self.conv_dim, 2, 2, 0, name="deconv", dtype=self.dtype)(y))
    y = ClassPredictor(self.num_classes + 1, name="predictor", dtype=self.dtype)(
        y, None if classes is None else classes.reshape(-1))
    return y.astype(jnp.float32).reshape(x.shape[:2] + y.shape[1:])


class ClassPredictor(nn.Module):
  """The mask predictor, a 1x1 convolution to one logit map per class, with `layers.Conv`'s parameters (`kernel`
  (1, 1, C, K+1), `bias` (K+1,)) so checkpoints and converters see the same tree. (N, S, S, C) -> (N, S, S, K+1),
  or with classes (N,) int -> (N, S, S): the class's column of the kernel per RoI, a dot over the channels."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y, classes=None):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, y.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    y, kernel = y.astype(self.dtype), kernel[0, 0].astype(self.dtype)
    if classes is None:
      return layers.add_bias(conv_ops.pointwise(y, kernel), bias)
    n, h, w, c = y.shape
    columns = jnp.take(kernel, classes, axis=1).T  # (N, C)
    logits = lax.dot_general(y.reshape(n, h * w, c), columns, (((2,), (1,)), ((0,), (0,))))  # (N, S * S)
    return logits.reshape(n, h, w) + jnp.take(bias, classes)[:, None, None].astype(logits.dtype)

