"""The keypoint head of Keypoint R-CNN: 8 conv 3x3 + deconv + 2x bilinear upsampling -> 56x56 heatmaps per keypoint,
and the decoding of heatmaps into keypoints with static shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from mrcnn_jax.modeling import layers

_TILE = 64  # resized-map pixels per side evaluated per step of `heatmaps_to_keypoints`
_BLOCK = 2  # source pixels per side of the blocks that `_tile_upper_bounds` takes extrema over
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


def _dense_cubic_weights(dst, scale, size: int):
  """torch's bicubic resize (align_corners=False) along one axis as a matrix: (..., T, size), row t holding the 4
  weights of destination pixel dst[..., t] at its (clamped) source taps, so that a resize is a matmul."""
  taps, w = _cubic_sampling(dst, scale, size)
  src = jnp.arange(size)
  return sum(jnp.where(taps[..., j, None] == src, w[..., j, None], 0.0) for j in range(4))


def _window_extrema(mx, mn, lo, hi, axis: int):
  """Max of mx and min of mn (n, k, A, B) over the index windows [lo, hi] (n, G) along `axis` (2: A, 3: B) ->
  two arrays (n, k, G, B) (axis 2) or (n, k, A, G) (axis 3)."""
  idx = jnp.arange(mx.shape[axis])
  inside = (idx >= lo[..., None]) & (idx <= hi[..., None])  # (n, G, L)
  if axis == 2:
    mask, mx, mn, reduce_axis = inside[:, None, :, :, None], mx[:, :, None], mn[:, :, None], 3
  else:
    mask, mx, mn, reduce_axis = inside[:, None, None], mx[:, :, :, None], mn[:, :, :, None], 4
  return (jnp.max(jnp.where(mask, mx, -jnp.inf), axis=reduce_axis),
          jnp.min(jnp.where(mask, mn, jnp.inf), axis=reduce_axis))


def _tile_upper_bounds(maps, rows_lo, rows_hi, cols_lo, cols_hi):
  """An upper bound (n, k, GY, GX) of the resized map's values in each tile, from the source pixels its taps read.

  Each resized value is sum_ab w_ab m_ab over a 4 x 4 window of the source map, with weights that sum to 1; torch's
  cubic kernel (A = -0.75) puts at most 0.1875 of negative weight on one axis, so at most 2 * 1.1875 * 0.1875 =
  0.4453125 on the product of two, and the value is at most max + 0.4453125 * (max - min) over the tile's source
  window. Max and min are taken over the _BLOCK x _BLOCK blocks of source pixels that meet the window (a superset
  of it, so the bound only grows), which makes them cheap. The small relative slack covers float32 rounding in the
  interpolation's sums.
  """
  n, k, s, _ = maps.shape
  pad = -s % _BLOCK
  blocks = jnp.pad(maps, ((0, 0), (0, 0), (0, pad), (0, pad)), mode="edge")
  blocks = blocks.reshape(n, k, (s + pad) // _BLOCK, _BLOCK, (s + pad) // _BLOCK, _BLOCK)
  row_mx, row_mn = _window_extrema(blocks.max(axis=(3, 5)), blocks.min(axis=(3, 5)), rows_lo // _BLOCK,
                                   rows_hi // _BLOCK, axis=2)  # (n, k, GY, blocks): over each tile row's window
  mx, mn = _window_extrema(row_mx, row_mn, cols_lo // _BLOCK, cols_hi // _BLOCK, axis=3)  # (n, k, GY, GX)
  return mx + 0.4453125 * (mx - mn) + 1e-5 * (jnp.abs(mx) + jnp.abs(mn))


def heatmaps_to_keypoints(heatmaps, boxes, max_hw):
  """Keypoints from heatmaps as torchvision's / Detectron2's `heatmaps_to_keypoints` give them, with static shapes.

  Those resize each RoI's S x S heatmap (bicubic, align_corners=False) to the RoI's size in pixels,
  ceil(w) x ceil(h), and take the first argmax: an array of dynamic shape. Here each resized map is cut into tiles of
  _TILE x _TILE pixels on a static grid that covers `max_hw`, and each tile gets an upper bound of its values from
  the source pixels it reads (`_tile_upper_bounds`). A `lax.while_loop` evaluates, for every RoI and keypoint, its
  not yet evaluated tile of highest bound, keeping a running maximum (ties go to the first pixel in row-major order,
  as torch's argmax), and stops when no RoI's remaining tiles can reach its maximum: the result is the full
  argmax's, and a peaked heatmap needs a few tiles instead of all of them. A tile is resized by two matmuls with the
  interpolation weights as matrices (`_dense_cubic_weights`; x first, then y, as torch), which XLA runs far faster
  than gathers of the taps, on CPU and on accelerators; their sums round in another order than torch's (values
  within about 1e-6 of torch's). Memory is one tile per RoI and keypoint, and the weight matrices of each RoI's tile
  rows and columns.

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
  offs = jnp.arange(_TILE, dtype=jnp.float32)
  # Each RoI's weights for every tile row and tile column: (n, GY, T, S) and (n, GX, T, S).
  weights_y = _dense_cubic_weights(jnp.arange(grid_y * _TILE, dtype=jnp.float32).reshape(1, grid_y, _TILE),
                                   scale_y[:, None, None], s)
  weights_x = _dense_cubic_weights(jnp.arange(grid_x * _TILE, dtype=jnp.float32).reshape(1, grid_x, _TILE),
                                   scale_x[:, None, None], s)
  pick = jax.vmap(lambda w, i: w[i])  # (n, G, T, S) at (n, k) -> (n, k, T, S)

  def step(carry):
    best, best_y, best_x, left = carry
    tile = jnp.argmax(left, axis=-1)  # (n, k): each RoI and keypoint's most promising tile not yet evaluated
    left = jnp.where(jnp.arange(left.shape[-1]) == tile[..., None], -jnp.inf, left)
    ty, tx = tile // grid_x, tile % grid_x
    dst_y = (ty * _TILE).astype(jnp.float32)[..., None] + offs  # (n, k, T)
    dst_x = (tx * _TILE).astype(jnp.float32)[..., None] + offs
    along_x = jnp.einsum("nkrc,nktc->nkrt", maps, pick(weights_x, tx), precision=jax.lax.Precision.HIGHEST)
    vals = jnp.einsum("nkyr,nkrt->nkyt", pick(weights_y, ty), along_x, precision=jax.lax.Precision.HIGHEST)
    inside = (dst_y < out_h[:, None, None])[..., :, None] & (dst_x < out_w[:, None, None])[..., None, :]
    vals = jnp.where(inside, vals, -jnp.inf).reshape(n, k, _TILE * _TILE)
    j = jnp.argmax(vals, axis=-1)  # first maximum in the tile, row-major
    v = jnp.take_along_axis(vals, j[..., None], axis=-1)[..., 0]
    y = jnp.take_along_axis(dst_y, (j // _TILE)[..., None], axis=-1)[..., 0]
    x = jnp.take_along_axis(dst_x, (j % _TILE)[..., None], axis=-1)[..., 0]
    earlier = (y * out_w[:, None] + x) < (best_y * out_w[:, None] + best_x)
    better = (v > best) | ((v == best) & earlier)
    return jnp.where(better, v, best), jnp.where(better, y, best_y), jnp.where(better, x, best_x), left

  def more(carry):
    best, left = carry[0], carry[3]
    top = jnp.max(left, axis=-1)  # -inf once a RoI and keypoint has no tile left inside its box
    return jnp.any((top >= best) & (top > -jnp.inf))

  init = (jnp.full((n, k), -jnp.inf), jnp.zeros((n, k)), jnp.zeros((n, k)), bound)
  score, y_int, x_int, _ = jax.lax.while_loop(more, step, init)
  x = (x_int + 0.5) * (widths / out_w)[:, None] + bx[:, 0, None]
  y = (y_int + 0.5) * (heights / out_h)[:, None] + bx[:, 1, None]
  return jnp.stack([x, y, score], axis=-1).reshape(b, d, k, 3)
