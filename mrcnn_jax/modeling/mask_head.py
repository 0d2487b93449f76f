"""The mask head of Mask R-CNN: 4 conv 3x3 + 2x deconv + a 1x1 conv with one 28x28 logit map per class."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from mrcnn_jax.modeling import layers


class MaskHead(nn.Module):
  """(B, R, 14, 14, C) RoI features -> (B, R, 28, 28, K+1) mask logits, float32 (channel 0: background, unused)."""

  num_classes: int
  num_convs: int = 4
  conv_dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x (B, R, 14, 14, C) -> (B, R, 28, 28, K+1): the conv tower, a 2x2 stride-2 deconv, one logit map per class."""
    y = layers.roi_conv_tower(x, self.num_convs, self.conv_dim, dtype=self.dtype)
    y = nn.relu(layers.conv_transpose(self.conv_dim, 2, 2, 0, name="deconv", dtype=self.dtype)(y))
    y = layers.conv(self.num_classes + 1, 1, name="predictor", dtype=self.dtype)(y)
    return y.astype(jnp.float32).reshape(x.shape[:2] + y.shape[1:])


def select_class_masks(logits, classes):
  """Per-pixel sigmoid of each detection's own class channel. logits (B, D, M, M, K+1), classes (B, D) int ->
  (B, D, M, M) float32 probabilities."""
  picked = jnp.take_along_axis(logits, classes[:, :, None, None, None], axis=-1)[..., 0]
  return nn.sigmoid(picked)
