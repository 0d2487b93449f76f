"""RoIAlign (He et al., Mask R-CNN, 2017): quantization-free bilinear pooling of box regions.

Two modules share the name. This one, `mrcnn_jax.ops.roi_align`, is the op: the sample positions and weights, and
the public API (`roi_align`, `assign_fpn_levels`, `multilevel_roi_align`). `mrcnn_jax.kernels.roi_align` (the
checkout's kernels/roi_align.py) is the weighted gather it ends in: the Pallas kernels and their XLA reference.

The op splits in two, and the split is the design:

1. Sample positions and bilinear weights (`roi_sample_points`). RoIAlign's sampling grid is a Cartesian product
   of per-axis sample positions, and a bilinear weight is a product of a y-weight and an x-weight, so each output
   bin is a fixed, small weighted sum over feature-map rows: `out[r, p, :] = sum_k w[r, p, k] * table[idx[r, p, k], :]`
   with K = (2 * samples_per_bin)**2 (each sample touches 2 rows and 2 columns). This part is cheap elementwise
   math on (R, bins, K) arrays, written once here for every backend.
2. The weighted gather itself, the memory-bound part: `kernels.roi_align.weighted_gather`, an XLA reference that
   runs everywhere and Pallas kernels for GPU and TPU (with a custom VJP).

Semantics are torchvision's `roi_align` (also Detectron2's `ROIAlign`/`ROIAlignV2`):
- `aligned=False` (legacy; torchvision's Mask R-CNN): box corners map to `x * spatial_scale`, and the RoI is at
  least 1x1 feature pixels.
- `aligned=True` (Detectron2's ROIAlignV2): a half-pixel shift, `x * spatial_scale - 0.5`, and no minimum size.
- `sampling_ratio > 0`: that many samples per bin along each axis. `sampling_ratio <= 0`: adaptive,
  `ceil(roi_size / output_size)` per axis and per RoI, bounded above by the static `max_sampling_ratio` (static
  shapes need a bound; a RoI needing more samples uses `max_sampling_ratio` evenly spaced ones instead).
- A sample at y < -1 or y > H (likewise x) reads 0; one in [-1, 0] reads the border; the bin is the mean of its
  samples.

Multi-level pooling (FPN) samples each RoI from its own level only, through one gather over the flattened levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

from mrcnn_jax.kernels import roi_align as _kernel
from mrcnn_jax.ops import frames as frame_ops

weighted_gather = _kernel.weighted_gather

DEFAULT_MAX_SAMPLING_RATIO = 4


def _pair(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  oh, ow = size
  return int(oh), int(ow)


def _axis_samples(start, length, bins: int, grid, max_grid: int, extent):
  """Per-axis sample rows and weights of RoIAlign.

  start, length: (R,) float32, the RoI's start and length along one axis in feature pixels (already shifted and
  clamped as the aligned mode says). bins: static output size along the axis. grid: (R,) int32 samples per bin,
  1 <= grid <= max_grid (0 means "no samples": the bin reads 0). extent: feature size along the axis, an int or an
  (R,) array (per-RoI level sizes).

  Returns rows (R, bins, 2*max_grid) int32 in [0, extent-1] and weights (R, bins, 2*max_grid) float32; the weights
  already hold the 1/grid of the bin mean and are 0 for unused or out-of-range samples.
  """
  dtype = jnp.float32
  extent = jnp.asarray(extent)
  if extent.ndim:
    extent = extent[:, None, None]
  extent_f = extent.astype(dtype)
  bin_size = (length / bins)[:, None, None]
  grid_f = jnp.maximum(grid, 1).astype(dtype)[:, None, None]
  p = jnp.arange(bins, dtype=dtype)[None, :, None]
  j = jnp.arange(max_grid, dtype=dtype)[None, None, :]
  # Same arithmetic order as torchvision's kernel, so samples land on the same float32 values.
  coord = start[:, None, None] + p * bin_size + (j + 0.5) * bin_size / grid_f
  used = jnp.arange(max_grid)[None, None, :] < grid[:, None, None]
  inside = (coord >= -1.0) & (coord <= extent_f)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord).astype(jnp.int32)
  at_end = low >= extent - 1
  low = jnp.where(at_end, extent - 1, low)
  high = jnp.where(at_end, extent - 1, low + 1)
  frac = jnp.where(at_end, 0.0, coord - low.astype(dtype))
  scale = jnp.where(used & inside, 1.0 / grid_f, 0.0)
  rows = jnp.concatenate([low, high], axis=-1)
  weights = jnp.concatenate([(1.0 - frac) * scale, frac * scale], axis=-1)
  return rows, weights


def roi_sample_points(
    boxes,
    output_size,
    spatial_scale,
    sampling_ratio: int,
    aligned: bool,
    feature_hw,
    *,
    max_sampling_ratio: int = DEFAULT_MAX_SAMPLING_RATIO,
):
  """Gather rows and weights of RoIAlign for boxes on one feature map (or one per box).

  boxes: (R, 4) XYXY in input-image pixels. output_size: (oh, ow). spatial_scale: a float or (R,) array
  (1 / stride of each box's feature map). feature_hw: (H, W) ints, or a pair of (R,) arrays.

  Returns (ys, wy, xs, wx): ys/wy (R, oh, Jy), xs/wx (R, ow, Jx) int32/float32 with J = 2 * samples per bin;
  the bin (i, j) of box r is sum_{a,b} wy[r,i,a] * wx[r,j,b] * feature[ys[r,i,a], xs[r,j,b]].
  """
  oh, ow = _pair(output_size)
  boxes = boxes.astype(jnp.float32)
  spatial_scale = jnp.asarray(spatial_scale, jnp.float32)
  offset = 0.5 if aligned else 0.0
  x1 = boxes[:, 0] * spatial_scale - offset
  y1 = boxes[:, 1] * spatial_scale - offset
  w = boxes[:, 2] * spatial_scale - offset - x1
  h = boxes[:, 3] * spatial_scale - offset - y1
  if not aligned:  # The legacy op forces malformed RoIs to be at least 1x1.
    w = jnp.maximum(w, 1.0)
    h = jnp.maximum(h, 1.0)
  if sampling_ratio > 0:
    max_grid = int(sampling_ratio)
    grid_h = jnp.full(h.shape, max_grid, jnp.int32)
    grid_w = jnp.full(w.shape, max_grid, jnp.int32)
  else:
    max_grid = int(max_sampling_ratio)
    grid_h = jnp.clip(jnp.ceil(h / oh), 0, max_grid).astype(jnp.int32)
    grid_w = jnp.clip(jnp.ceil(w / ow), 0, max_grid).astype(jnp.int32)
  height, width = feature_hw
  ys, wy = _axis_samples(y1, h, oh, grid_h, max_grid, height)
  xs, wx = _axis_samples(x1, w, ow, grid_w, max_grid, width)
  return ys, wy, xs, wx


def combine_sample_points(ys, wy, xs, wx, row_stride, base):
  """Outer product of per-axis samples (from `roi_sample_points`) into flat table rows and weights.

  row_stride: table rows per feature-map row (W), an int or (R,) array; base: (R,) first table row of each box's
  feature map. Returns idx (R, oh*ow, Jy*Jx) int32 and weights (R, oh*ow, Jy*Jx) float32, the arguments of
  `weighted_gather`.
  """
  r, oh, jy = ys.shape
  ow, jx = xs.shape[1], xs.shape[2]
  row_stride = jnp.asarray(row_stride)
  base = jnp.asarray(base)
  if row_stride.ndim:
    row_stride = row_stride[:, None, None, None, None]
  if base.ndim:
    base = base[:, None, None, None, None]
  idx = base + ys[:, :, None, :, None] * row_stride + xs[:, None, :, None, :]
  w = wy[:, :, None, :, None] * wx[:, None, :, None, :]
  return idx.reshape(r, oh * ow, jy * jx).astype(jnp.int32), w.reshape(r, oh * ow, jy * jx)


def roi_align(
    features,
    boxes,
    output_size,
    spatial_scale,
    sampling_ratio,
    aligned,
    *,
    max_sampling_ratio: int = DEFAULT_MAX_SAMPLING_RATIO,
    impl: str | None = None,
):
  """RoIAlign on one feature map.

  Args:
    features: (B, H, W, C), NHWC.
    boxes: (B, R, 4) XYXY float32 in input-image pixels; box r of image b pools from features[b].
    output_size: int or (oh, ow).
    spatial_scale: feature pixels per input pixel (1 / stride).
    sampling_ratio: samples per bin along each axis; <= 0 for the adaptive form (bounded by max_sampling_ratio).
    aligned: True for the half-pixel form (Detectron2 ROIAlignV2), False for the legacy form (torchvision).
    max_sampling_ratio: static bound of the adaptive form.
    impl: "xla", "pallas" (the GPU or TPU kernel), "pallas_interpret_gpu" / "pallas_interpret_tpu" (that kernel in
      the Pallas interpreter, for tests on CPU), or None (the backend's default: `kernels.roi_align.default_impl`).

  Returns:
    (B, R, oh, ow, C) in the dtype of `features`.
  """
  b, h, w, c = features.shape
  _, r, _ = boxes.shape
  oh, ow = _pair(output_size)
  ys, wy, xs, wx = roi_sample_points(
      boxes.reshape(b * r, 4), (oh, ow), spatial_scale, sampling_ratio, aligned, (h, w),
      max_sampling_ratio=max_sampling_ratio)
  base = jnp.repeat(jnp.arange(b, dtype=jnp.int32) * (h * w), r)
  idx, weights = combine_sample_points(ys, wy, xs, wx, w, base)
  out = weighted_gather(features.reshape(b * h * w, c), idx, weights, impl=impl)
  return out.reshape(b, r, oh, ow, c)


def assign_fpn_levels(
    boxes,
    min_level: int,
    max_level: int,
    canonical_size: float = 224,
    canonical_level: int = 4,
    *,
    convention: str = "detectron2",
):
  """FPN level of each box (Lin et al., FPN, eq. 1): floor(canonical_level + log2(sqrt(area) / canonical_size)),
  clamped to [min_level, max_level]. boxes: (..., 4) XYXY -> (...) int32.

  The two frameworks guard the logarithm differently, which moves boxes that sit on a level boundary:
  "detectron2" takes log2(s / canonical + 1e-8), "torchvision" (LevelMapper) takes log2(s / canonical) + 1e-6.
  """
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  scale = jnp.sqrt(jnp.maximum(area, 0.0).astype(jnp.float32))
  if convention == "detectron2":
    level = jnp.floor(canonical_level + jnp.log2(scale / canonical_size + 1e-8))
  elif convention == "torchvision":
    level = jnp.floor(canonical_level + jnp.log2(scale / canonical_size) + 1e-6)
  else:
    raise ValueError(f"assign_fpn_levels: unknown convention {convention!r}; expected 'detectron2' or 'torchvision'")
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(
    features: Sequence,
    boxes,
    output_size,
    sampling_ratio,
    aligned,
    min_level: int = 2,
    canonical_size: float = 224,
    canonical_level: int = 4,
    *,
    level_convention: str = "detectron2",
    max_sampling_ratio: int = DEFAULT_MAX_SAMPLING_RATIO,
    impl: str | None = None,
    frames=None,
):
  """RoIAlign over FPN levels: each box pools from the level `assign_fpn_levels` gives it, and only from it.

  Args:
    features: list of (B, H_l, W_l, C) for levels min_level, min_level+1, ...; level l has stride 2**l.
    boxes: (B, R, 4) XYXY float32 in input-image pixels.
    level_convention: how boxes on a level boundary are assigned (`assign_fpn_levels`'s convention).
    frames: optional (B, 2) int32 frame of each image (`ops.frames`): samples are clamped to the frame's extent at
      each level (the feature map the image would have alone) instead of the canvas's; None: the whole map.
    Others as in `roi_align`.

  Returns:
    (B, R, oh, ow, C). All levels are flattened into one table and sampled by one gather, so the cost is that
    of a single-level RoIAlign, not one per level.
  """
  num_levels = len(features)
  max_level = min_level + num_levels - 1
  b = features[0].shape[0]
  c = features[0].shape[-1]
  _, r, _ = boxes.shape
  oh, ow = _pair(output_size)
  flat_boxes = boxes.reshape(b * r, 4)
  level = assign_fpn_levels(
      flat_boxes, min_level, max_level, canonical_size, canonical_level, convention=level_convention) - min_level
  heights = jnp.array([f.shape[1] for f in features], jnp.int32)
  widths = jnp.array([f.shape[2] for f in features], jnp.int32)
  sizes = [math.prod(f.shape[:3]) for f in features]
  starts = jnp.array([sum(sizes[:i]) for i in range(num_levels)], jnp.int32)
  scales = jnp.array([2.0 ** -(min_level + i) for i in range(num_levels)], jnp.float32)
  h_r, w_r = heights[level], widths[level]
  image = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
  extent_hw = (h_r, w_r)
  if frames is not None:
    # (B, L, 2) rows and columns inside each image's frame per level, then per RoI.
    extents = jnp.stack([frame_ops.frame_extent(frames, 2 ** (min_level + i)) for i in range(num_levels)], axis=1)
    extent_hw = (extents[image, level, 0], extents[image, level, 1])
  ys, wy, xs, wx = roi_sample_points(
      flat_boxes, (oh, ow), scales[level], sampling_ratio, aligned, extent_hw,
      max_sampling_ratio=max_sampling_ratio)
  base = starts[level] + image * h_r * w_r
  idx, weights = combine_sample_points(ys, wy, xs, wx, w_r, base)
  table = jnp.concatenate([f.reshape(-1, c) for f in features], axis=0)
  out = weighted_gather(table, idx, weights, impl=impl)
  return out.reshape(b, r, oh, ow, c)
