"""ResNet (He et al., 2016), NHWC, returning the outputs of res2..res5: 50 and 101 layers with bottleneck blocks,
18 and 34 with basic blocks (two 3x3 convs; for small, fast models such as the shapes job's).

Two weight families differ in where a bottleneck stage's stride sits: MSRA/Detectron2 weights put it in the first 1x1
conv of the block (`stride_in_1x1=True`), torchvision's in the 3x3 conv. `freeze_at` follows Detectron2: 1 freezes
the stem, 2 the stem and res2, ...; frozen stages are cut from the gradient here (and left out of the update by the
trainer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from mrcnn_jax.modeling import layers
from mrcnn_jax.ops import frames as frame_ops

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BOTTLENECK_DEPTHS = (50, 101)  # 18 and 34 use basic blocks (two 3x3 convs), for small and fast models
STAGE_WIDTHS = (64, 128, 256, 512)  # block widths of res2..res5 at width=64; bottleneck outputs are 4x wider


class _Block(nn.Module):
  """What the two residual blocks share: their settings, their norm layers and the projection shortcut."""

  width: int
  stride: int
  norm: str
  norm_eps: float
  train: bool = False
  dtype: jnp.dtype = jnp.float32

  def _norm(self, name: str) -> nn.Module:
    return layers.make_norm(self.norm, train=self.train, eps=self.norm_eps, name=name, dtype=self.dtype)

  def _shortcut(self, x, features: int):
    """x itself, or a strided 1x1 conv and its norm where the block changes the channels or the resolution."""
    if x.shape[-1] == features and self.stride == 1:
      return x
    shortcut = layers.conv(features, 1, stride=self.stride, use_bias=False, name="shortcut_conv", dtype=self.dtype)(x)
    return self._norm("shortcut_norm")(shortcut)


class Bottleneck(_Block):
  """1x1, 3x3 and 1x1 convs with a residual (ResNet-50/101), 4 * width outputs; the stride in the first 1x1 conv
  (`stride_in_1x1`, MSRA weights) or in the 3x3 (torchvision's)."""

  stride_in_1x1: bool = True

  @nn.compact
  def __call__(self, x, frames=None, stride_in: int = 1):
    """x (B, H, W, C) at stride `stride_in` of the image; frames: (B, 2) int32 or None (see `ResNet`)."""
    out_features = 4 * self.width
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    shortcut = self._shortcut(x, out_features)
    y = layers.conv(self.width, 1, stride=s1, use_bias=False, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(self._norm("norm1")(y))
    y = frame_ops.mask_to_frame(y, frames, stride_in * s1)  # the 3x3 conv reads zeros past the frame
    y = layers.conv(self.width, 3, stride=s3, use_bias=False, name="conv2", dtype=self.dtype)(y)
    y = nn.relu(self._norm("norm2")(y))
    y = layers.conv(out_features, 1, use_bias=False, name="conv3", dtype=self.dtype)(y)
    y = self._norm("norm3")(y)
    return nn.relu(y + shortcut)


class BasicBlock(_Block):
  """Two 3x3 convs with a residual (ResNet-18/34), the stride in the first."""

  @nn.compact
  def __call__(self, x, frames=None, stride_in: int = 1):
    """x (B, H, W, C) at stride `stride_in` of the image; frames: (B, 2) int32 or None (see `ResNet`)."""
    shortcut = x
    x = frame_ops.mask_to_frame(x, frames, stride_in)
    if x.shape[-1] != self.width or self.stride != 1:
      shortcut = self._shortcut(x, self.width)
    y = layers.conv(self.width, 3, stride=self.stride, use_bias=False, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(self._norm("norm1")(y))
    y = frame_ops.mask_to_frame(y, frames, stride_in * self.stride)
    y = layers.conv(self.width, 3, use_bias=False, name="conv2", dtype=self.dtype)(y)
    return nn.relu(self._norm("norm2")(y) + shortcut)


class ResNet(nn.Module):
  """images (B, H, W, 3) -> {2: (B, H/4, W/4, C2), ..., 5: (B, H/32, W/32, C5)}.

  Channels: 256, 512, 1024, 2048 for ResNet-50/101 (bottlenecks); 64, 128, 256, 512 for ResNet-18/34 (basic
  blocks); all scaled by width / 64.

  frames: optional (B, 2) int32 frame of each image (`ops.frames`). Every spatial convolution and the stem's max
  pool then read zeros outside the frame, so that the features inside it are those of the image padded to its
  frame alone; outside it the outputs are not meaningful. None: the canvas is every image's frame.
  """

  depth: int = 50
  norm: str = "FrozenBN"
  norm_eps: float = 1e-5
  stride_in_1x1: bool = True
  freeze_at: int = 2
  width: int = 64
  train: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, frames=None):
    if self.depth not in STAGE_BLOCKS:
      raise ValueError(f"ResNet depth {self.depth} is not supported; expected one of {sorted(STAGE_BLOCKS)}")
    x = frame_ops.mask_to_frame(x.astype(self.dtype), frames, 1)
    x = layers.conv(self.width, 7, stride=2, use_bias=False, name="stem_conv", dtype=self.dtype)(x)
    x = layers.make_norm(self.norm, train=self.train, eps=self.norm_eps, name="stem_norm", dtype=self.dtype)(x)
    # After the ReLU every value is >= 0, so zeros past the frame pool like torch's -inf padding.
    x = layers.max_pool(frame_ops.mask_to_frame(nn.relu(x), frames, 2), 3, 2, 1)
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    outputs = {}
    for stage, (num_blocks, width) in enumerate(zip(STAGE_BLOCKS[self.depth], STAGE_WIDTHS)):
      level = stage + 2
      width = width * self.width // 64
      for i in range(num_blocks):
        stride = 2 if (i == 0 and level > 2) else 1
        settings = dict(width=width, stride=stride, norm=self.norm, norm_eps=self.norm_eps, train=self.train,
                        dtype=self.dtype, name=f"res{level}_{i}")
        if self.depth in BOTTLENECK_DEPTHS:
          block = Bottleneck(stride_in_1x1=self.stride_in_1x1, **settings)
        else:
          block = BasicBlock(**settings)
        x = block(x, frames, 2 ** (level - 1) if (i == 0 and level > 2) else 2 ** level)
      if self.freeze_at >= level:
        x = jax.lax.stop_gradient(x)
      outputs[level] = x
    return outputs
