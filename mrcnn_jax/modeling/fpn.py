"""Feature Pyramid Network (Lin et al., 2017): P2..P5 from res2..res5, P6 by max-pooling P5."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from mrcnn_jax.modeling import layers
from mrcnn_jax.ops import frames as frame_ops


class FPN(nn.Module):
  """{2..5: C_l} -> {2..6: P_l}, each (B, H/2**l, W/2**l, channels).

  Top-down: P5 = lateral5(C5); P_l = lateral_l(C_l) + nearest-upsample(P_{l+1} before its 3x3 output conv); every
  level then goes through its own 3x3 conv. P6 = max_pool(P5, kernel 1, stride 2) (torchvision and Detectron2's
  LastLevelMaxPool). frames: optional (B, 2) int32 (`ops.frames`): each 3x3 output conv reads zeros outside the
  image's frame.
  """

  channels: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, feats, frames=None):
    levels = sorted(feats)
    inner = None
    outputs = {}
    for level in reversed(levels):
      lateral = layers.conv(self.channels, 1, name=f"lateral{level}", dtype=self.dtype)(feats[level])
      inner = lateral if inner is None else lateral + layers.upsample_nearest(inner, lateral.shape[1:3])
      inner_in_frame = frame_ops.mask_to_frame(inner, frames, 2**level)
      outputs[level] = layers.conv(self.channels, 3, name=f"output{level}", dtype=self.dtype)(inner_in_frame)
    top = levels[-1]
    outputs[top + 1] = layers.max_pool(outputs[top], 1, 2, 0)
    return dict(sorted(outputs.items()))
