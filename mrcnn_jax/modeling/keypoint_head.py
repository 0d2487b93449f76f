"""The keypoint head of Keypoint R-CNN: 8 conv 3x3 + deconv + 2x bilinear upsampling -> 56x56 heatmaps per keypoint,
and the decoding of heatmaps into keypoints with static shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from mrcnn_jax.modeling import layers

# Half-width, in heatmap cells, of the window around each heatmap's peak in which the resized map is searched, and
# the static bound of that window in image pixels (see `heatmaps_to_keypoints`).
_PEAK_RADIUS_CELLS = 2
_MAX_WINDOW_PX = 128


class KeypointHead(nn.Module):
  """(B, R, 14, 14, C) RoI features -> (B, R, 56, 56, num_keypoints) heatmap logits, float32."""

  num_keypoints: int = 17
  num_convs: int = 8
  conv_dim: int = 512
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, r = x.shape[:2]
    x = x.reshape((b * r,) + x.shape[2:]).astype(self.dtype)
    for i in range(self.num_convs):
      x = nn.relu(layers.conv(self.conv_dim, 3, name=f"conv{i + 1}", dtype=self.dtype)(x))
    x = layers.conv_transpose(self.num_keypoints, 4, 2, 1, name="deconv", dtype=self.dtype)(x)
    x = x.astype(jnp.float32)
    x = upsample_bilinear_2x(x)
    return x.reshape((b, r) + x.shape[1:])


def _linear_weights(out_size: int, in_size: int):
  """(out, in) weights of torch's bilinear resize (align_corners=False) along one axis."""
  src = jnp.maximum((jnp.arange(out_size, dtype=jnp.float32) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = jnp.floor(src).astype(jnp.int32)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  return (jax.nn.one_hot(i0, in_size) * (1 - frac)[:, None]) + (jax.nn.one_hot(i1, in_size) * frac[:, None])


def upsample_bilinear_2x(x):
  """torch's F.interpolate(scale_factor=2, mode="bilinear", align_corners=False) on NHWC."""
  _, h, w, _ = x.shape
  wy = _linear_weights(2 * h, h)
  wx = _linear_weights(2 * w, w)
  return jnp.einsum("yh,bhwc,xw->byxc", wy, x, wx, precision=jax.lax.Precision.HIGHEST)


def _cubic_weights(dst, scale, in_size: int):
  """Weights (..., in_size) of torch's bicubic resize (A = -0.75, align_corners=False, border-clamped taps) for
  destination pixel indices `dst` (float array) and scale = in / out (per element, broadcastable)."""
  a = -0.75
  src = (dst + 0.5) * scale - 0.5  # no clamp at 0 for cubic, as in torch
  x0 = jnp.floor(src)
  t = src - x0
  cc1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731
  cc2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731
  taps = (cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t))
  out = 0.0
  for k, w in enumerate(taps):
    idx = jnp.clip(x0.astype(jnp.int32) + k - 1, 0, in_size - 1)
    out = out + jax.nn.one_hot(idx, in_size) * w[..., None]
  return out


def heatmaps_to_keypoints(heatmaps, boxes):
  """Keypoints from heatmaps, as torchvision's / Detectron2's `heatmaps_to_keypoints`.

  Those resize each RoI's heatmap (bicubic) to the RoI's size in pixels, ceil(w) x ceil(h), and take the argmax: a
  dynamic shape. Here the resized map is evaluated only in a static window of at most _MAX_WINDOW_PX pixels per axis
  around the peak of the raw heatmap (+-_PEAK_RADIUS_CELLS cells), where its maximum lies unless the heatmap has a
  second peak almost as high further away.

  Args:
    heatmaps: (B, D, S, S, K) logits; boxes: (B, D, 4) XYXY.
  Returns:
    (B, D, K, 3): x, y in input pixels (pixel centres: +0.5) and the resized heatmap's value there.
  """
  b, d, s, _, k = heatmaps.shape
  maps = jnp.moveaxis(heatmaps, -1, 2).reshape(b * d, k, s, s)  # (N, K, S, S)
  bx = boxes.reshape(b * d, 4)
  widths = jnp.maximum(bx[:, 2] - bx[:, 0], 1.0)
  heights = jnp.maximum(bx[:, 3] - bx[:, 1], 1.0)
  out_w = jnp.ceil(widths)
  out_h = jnp.ceil(heights)
  scale_x = s / out_w  # in / out
  scale_y = s / out_h
  peak = jnp.argmax(maps.reshape(b * d, k, s * s), axis=-1)
  peak_y, peak_x = peak // s, peak % s
  win = _MAX_WINDOW_PX

  def window_start(peak_cell, scale, out_size):
    # First destination pixel whose source coordinate reaches peak - radius cells.
    lo = (peak_cell - _PEAK_RADIUS_CELLS + 0.5) / scale[:, None] - 0.5
    lo = jnp.clip(jnp.floor(lo), 0, jnp.maximum(out_size[:, None] - win, 0))
    return lo

  y0 = window_start(peak_y.astype(jnp.float32), scale_y, out_h)  # (N, K)
  x0 = window_start(peak_x.astype(jnp.float32), scale_x, out_w)
  offs = jnp.arange(win, dtype=jnp.float32)
  dst_y = y0[..., None] + offs  # (N, K, win)
  dst_x = x0[..., None] + offs
  wy = _cubic_weights(dst_y, scale_y[:, None, None], s)  # (N, K, win, S)
  wx = _cubic_weights(dst_x, scale_x[:, None, None], s)
  vals = jnp.einsum("nkys,nkst,nkxt->nkyx", wy, maps, wx, precision=jax.lax.Precision.HIGHEST)
  inside = (dst_y < out_h[:, None, None])[..., :, None] & (dst_x < out_w[:, None, None])[..., None, :]
  vals = jnp.where(inside, vals, -jnp.inf)
  flat = jnp.argmax(vals.reshape(b * d, k, win * win), axis=-1)
  iy, ix = flat // win, flat % win
  score = jnp.take_along_axis(vals.reshape(b * d, k, win * win), flat[..., None], axis=-1)[..., 0]
  y_int = jnp.take_along_axis(dst_y, iy[..., None], axis=-1)[..., 0]
  x_int = jnp.take_along_axis(dst_x, ix[..., None], axis=-1)[..., 0]
  x = (x_int + 0.5) * (widths / out_w)[:, None] + bx[:, 0, None]
  y = (y_int + 0.5) * (heights / out_h)[:, None] + bx[:, 1, None]
  return jnp.stack([x, y, score], axis=-1).reshape(b, d, k, 3)
