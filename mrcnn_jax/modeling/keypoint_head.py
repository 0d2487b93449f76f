"""The keypoint head of Keypoint R-CNN: 8 conv 3x3 + deconv + 2x bilinear upsampling -> 56x56 heatmaps per keypoint,
and the decoding of heatmaps into keypoints with static shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from mrcnn_jax.modeling import layers

_TILE = 64  # resized-map pixels per side evaluated per step of `heatmaps_to_keypoints`
_CUBIC_A = -0.75  # torch's bicubic


def _cubic_taps(t):
  """The 4 weights of torch's bicubic kernel for fractional offset t, on taps floor-1 .. floor+2. t: any shape ->
  (..., 4)."""
  a = _CUBIC_A
  cc1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731
  cc2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731
  return jnp.stack([cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t)], axis=-1)


def _cubic_sampling(dst, scale, size: int):
  """Taps (..., 4) int32 and weights (..., 4) of torch's bicubic resize (align_corners=False) at destination pixels
  dst (float) with scale = in / out; taps are clamped to [0, size-1] as torch reads them."""
  src = (dst + 0.5) * scale - 0.5  # no clamp at 0 for cubic, as in torch
  x0 = jnp.floor(src)
  taps = jnp.clip(x0.astype(jnp.int32)[..., None] + jnp.arange(-1, 3), 0, size - 1)
  return taps, _cubic_taps(src - x0)


class KeypointHead(nn.Module):
  """(B, R, 14, 14, C) RoI features -> (B, R, 56, 56, num_keypoints) heatmap logits, float32."""

  num_keypoints: int = 17
  num_convs: int = 8
  conv_dim: int = 512
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x (B, R, 14, 14, C) -> (B, R, 56, 56, K): the conv tower, a 4x4 stride-2 deconv to 28x28, then 2x bilinear."""
    y = layers.roi_conv_tower(x, self.num_convs, self.conv_dim, dtype=self.dtype)
    y = layers.conv_transpose(self.num_keypoints, 4, 2, 1, name="deconv", dtype=self.dtype)(y)
    y = upsample_bilinear_2x(y.astype(jnp.float32))
    return y.reshape(x.shape[:2] + y.shape[1:])


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


def heatmaps_to_keypoints(heatmaps, boxes):
  """Keypoints from heatmaps, exactly as torchvision's / Detectron2's `heatmaps_to_keypoints`, with static shapes.

  Those resize each RoI's S x S heatmap (bicubic, align_corners=False) to the RoI's size in pixels,
  ceil(w) x ceil(h), and take the first argmax: an array of dynamic shape. Here the resized maps of all RoIs are
  evaluated in tiles of _TILE x _TILE pixels inside a `lax.while_loop` that runs as many steps as the largest RoI
  needs, keeping a running maximum (ties go to the first pixel in row-major order, as torch's argmax). Memory is
  one tile per RoI and keypoint; the work is that of the full resize of the largest RoI, for every RoI.

  Args:
    heatmaps: (B, D, S, S, K) logits; boxes: (B, D, 4) XYXY.
  Returns:
    (B, D, K, 3): x, y in input pixels (the resized pixel's centre) and the resized heatmap's value there.
  """
  b, d, s, _, k = heatmaps.shape
  n = b * d
  maps = jnp.moveaxis(heatmaps, -1, 2).reshape(n, k, s, s).astype(jnp.float32)
  bx = boxes.reshape(n, 4).astype(jnp.float32)
  widths = jnp.maximum(bx[:, 2] - bx[:, 0], 1.0)
  heights = jnp.maximum(bx[:, 3] - bx[:, 1], 1.0)
  out_w = jnp.ceil(widths)
  out_h = jnp.ceil(heights)
  scale_y = s / out_h  # in / out, as torch computes it for an output size
  scale_x = s / out_w
  tiles_x = jnp.ceil(out_w / _TILE).astype(jnp.int32)
  tiles_y = jnp.ceil(out_h / _TILE).astype(jnp.int32)
  max_tx = jnp.max(tiles_x)
  num_steps = jnp.max(tiles_y) * max_tx
  offs = jnp.arange(_TILE, dtype=jnp.float32)

  def step(carry):
    i, best, best_y, best_x = carry
    ty, tx = i // max_tx, i % max_tx
    dst_y = (ty * _TILE).astype(jnp.float32) + offs  # (T,)
    dst_x = (tx * _TILE).astype(jnp.float32) + offs
    rows, wy = _cubic_sampling(dst_y[None, :], scale_y[:, None], s)  # (n, T, 4)
    cols, wx = _cubic_sampling(dst_x[None, :], scale_x[:, None], s)
    # Along x first, then y: torch's order of the two 1-D interpolations.
    gathered = jnp.take_along_axis(maps[:, :, :, None, :], cols[:, None, None, :, :], axis=-1)  # (n, k, S, T, 4)
    along_x = jnp.sum(gathered * wx[:, None, None], axis=-1)  # (n, k, S, T)
    picked = jnp.take_along_axis(along_x[:, :, None, :, :], rows[:, None, :, :, None], axis=3)  # (n, k, T, 4, T)
    vals = jnp.sum(picked * wy[:, None, :, :, None], axis=3)  # (n, k, T(y), T(x))
    inside = (dst_y[None, :] < out_h[:, None])[:, :, None] & (dst_x[None, :] < out_w[:, None])[:, None, :]
    vals = jnp.where(inside[:, None], vals, -jnp.inf).reshape(n, k, _TILE * _TILE)
    j = jnp.argmax(vals, axis=-1)  # first maximum in the tile, row-major
    v = jnp.take_along_axis(vals, j[..., None], axis=-1)[..., 0]
    y = dst_y[j // _TILE]
    x = dst_x[j % _TILE]
    earlier = (y * out_w[:, None] + x) < (best_y * out_w[:, None] + best_x)
    better = (v > best) | ((v == best) & earlier)
    return (i + 1, jnp.where(better, v, best), jnp.where(better, y, best_y), jnp.where(better, x, best_x))

  init = (jnp.int32(0), jnp.full((n, k), -jnp.inf), jnp.zeros((n, k)), jnp.zeros((n, k)))
  _, score, y_int, x_int = jax.lax.while_loop(lambda c: c[0] < num_steps, step, init)
  x = (x_int + 0.5) * (widths / out_w)[:, None] + bx[:, 0, None]
  y = (y_int + 0.5) * (heights / out_h)[:, None] + bx[:, 1, None]
  return jnp.stack([x, y, score], axis=-1).reshape(b, d, k, 3)
