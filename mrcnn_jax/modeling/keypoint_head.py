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


def _window_bounds(maps, lo, hi, axis: int):
  """Max and min of maps (n, k, S, S) over the index windows [lo, hi] (n, G) along `axis` (2: rows, 3: columns),
  one window after another: -> two (n, k, G, S) arrays (the other spatial axis kept)."""
  idx = jnp.arange(maps.shape[axis])

  def one(window):
    l, h = window  # (n,), (n,)
    shape = (-1, 1, maps.shape[axis], 1) if axis == 2 else (-1, 1, 1, maps.shape[axis])
    inside = ((idx >= l[:, None]) & (idx <= h[:, None])).reshape(shape)
    return (jnp.max(jnp.where(inside, maps, -jnp.inf), axis=axis),
            jnp.min(jnp.where(inside, maps, jnp.inf), axis=axis))

  mx, mn = jax.lax.map(one, (lo.T, hi.T))  # (G, n, k, S)
  return jnp.moveaxis(mx, 0, 2), jnp.moveaxis(mn, 0, 2)


def _tile_upper_bounds(maps, rows_lo, rows_hi, cols_lo, cols_hi):
  """An upper bound (n, k, GY, GX) of the resized map's values in each tile, from the source pixels its taps read.

  Each resized value is sum_ab w_ab m_ab over a 4 x 4 window of the source map, with weights that sum to 1; torch's
  cubic kernel (A = -0.75) puts at most 0.1875 of negative weight on one axis, so at most 2 * 1.1875 * 0.1875 =
  0.4453125 on the product of two, and the value is at most max + 0.4453125 * (max - min) over the tile's source
  window. The small relative slack covers float32 rounding in the interpolation's sums.
  """
  row_mx, row_mn = _window_bounds(maps, rows_lo, rows_hi, axis=2)  # (n, k, GY, S): max over each tile row's window
  mx, _ = _window_bounds(row_mx, cols_lo, cols_hi, axis=3)  # (n, k, GY, GX)
  _, mn = _window_bounds(row_mn, cols_lo, cols_hi, axis=3)
  mx, mn = jnp.moveaxis(mx, 2, 3), jnp.moveaxis(mn, 2, 3)  # (n, k, GX, GY) -> (n, k, GY, GX)
  return mx + 0.4453125 * (mx - mn) + 1e-5 * (jnp.abs(mx) + jnp.abs(mn))


def heatmaps_to_keypoints(heatmaps, boxes, max_hw):
  """Keypoints from heatmaps, exactly as torchvision's / Detectron2's `heatmaps_to_keypoints`, with static shapes.

  Those resize each RoI's S x S heatmap (bicubic, align_corners=False) to the RoI's size in pixels,
  ceil(w) x ceil(h), and take the first argmax: an array of dynamic shape. Here each resized map is cut into tiles of
  _TILE x _TILE pixels on a static grid that covers `max_hw`, and each tile gets an upper bound of its values from
  the source pixels it reads (`_tile_upper_bounds`). A `lax.while_loop` evaluates, for every RoI and keypoint, its
  tiles in decreasing order of bound, keeping a running maximum (ties go to the first pixel in row-major order, as
  torch's argmax), and stops when no RoI's next tile can reach its maximum: the result is the full argmax's, and a
  peaked heatmap needs a few tiles instead of all of them. Memory is one tile per RoI and keypoint.

  Args:
    heatmaps: (B, D, S, S, K) logits; boxes: (B, D, 4) XYXY, inside a (H, W) = max_hw image (static ints; boxes
      past it would have tiles off the grid).
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
  grid_y, grid_x = -(-int(max_hw[0]) // _TILE), -(-int(max_hw[1]) // _TILE)

  def windows(out, scale, grid):
    """Per RoI and tile index along one axis: the first and last source tap the tile's pixels read, (n, grid)."""
    first = jnp.arange(grid, dtype=jnp.float32) * _TILE
    last = jnp.minimum(first[None, :] + (_TILE - 1), out[:, None] - 1)
    lo, _ = _cubic_sampling(jnp.broadcast_to(first, last.shape), scale[:, None], s)
    hi, _ = _cubic_sampling(last, scale[:, None], s)
    return lo[..., 0], hi[..., -1], first[None, :] < out[:, None]

  rows_lo, rows_hi, rows_in = windows(out_h, scale_y, grid_y)
  cols_lo, cols_hi, cols_in = windows(out_w, scale_x, grid_x)
  bound = _tile_upper_bounds(maps, rows_lo, rows_hi, cols_lo, cols_hi)
  bound = jnp.where((rows_in[:, :, None] & cols_in[:, None, :])[:, None], bound, -jnp.inf)
  bound = bound.reshape(n, k, grid_y * grid_x)
  order = jnp.argsort(-bound, axis=-1)
  bound = jnp.take_along_axis(bound, order, axis=-1)
  offs = jnp.arange(_TILE, dtype=jnp.float32)

  def step(carry):
    i, best, best_y, best_x = carry
    tile = order[:, :, i]  # (n, k): each RoI and keypoint's i-th most promising tile
    dst_y = ((tile // grid_x) * _TILE).astype(jnp.float32)[..., None] + offs  # (n, k, T)
    dst_x = ((tile % grid_x) * _TILE).astype(jnp.float32)[..., None] + offs
    rows, wy = _cubic_sampling(dst_y, scale_y[:, None, None], s)  # (n, k, T, 4)
    cols, wx = _cubic_sampling(dst_x, scale_x[:, None, None], s)
    # Along x first, then y: torch's order of the two 1-D interpolations.
    gathered = jnp.take_along_axis(maps, cols.reshape(n, k, 1, _TILE * 4), axis=-1).reshape(n, k, s, _TILE, 4)
    along_x = jnp.sum(gathered * wx[:, :, None], axis=-1)  # (n, k, S, T)
    picked = jnp.take_along_axis(along_x, rows.reshape(n, k, _TILE * 4, 1), axis=2).reshape(n, k, _TILE, 4, _TILE)
    vals = jnp.sum(picked * wy[..., None], axis=3)  # (n, k, T(y), T(x))
    inside = (dst_y < out_h[:, None, None])[..., :, None] & (dst_x < out_w[:, None, None])[..., None, :]
    vals = jnp.where(inside, vals, -jnp.inf).reshape(n, k, _TILE * _TILE)
    j = jnp.argmax(vals, axis=-1)  # first maximum in the tile, row-major
    v = jnp.take_along_axis(vals, j[..., None], axis=-1)[..., 0]
    y = jnp.take_along_axis(dst_y, (j // _TILE)[..., None], axis=-1)[..., 0]
    x = jnp.take_along_axis(dst_x, (j % _TILE)[..., None], axis=-1)[..., 0]
    earlier = (y * out_w[:, None] + x) < (best_y * out_w[:, None] + best_x)
    better = (v > best) | ((v == best) & earlier)
    return (i + 1, jnp.where(better, v, best), jnp.where(better, y, best_y), jnp.where(better, x, best_x))

  def more(carry):
    i, best = carry[0], carry[1]
    next_bound = jax.lax.dynamic_index_in_dim(bound, jnp.minimum(i, bound.shape[-1] - 1), axis=-1, keepdims=False)
    return (i < bound.shape[-1]) & jnp.any(next_bound >= best)

  init = (jnp.int32(0), jnp.full((n, k), -jnp.inf), jnp.zeros((n, k)), jnp.zeros((n, k)))
  _, score, y_int, x_int = jax.lax.while_loop(more, step, init)
  x = (x_int + 0.5) * (widths / out_w)[:, None] + bx[:, 0, None]
  y = (y_int + 0.5) * (heights / out_h)[:, None] + bx[:, 1, None]
  return jnp.stack([x, y, score], axis=-1).reshape(b, d, k, 3)
