"""Instance masks: GT masks cropped to their boxes (host side), and predicted masks pasted into the image.

Two representations of a mask meet here:
  * a small square grid attached to a box (the mask head's M x M output, or a GT mask stored as an M x M crop of
    its own box, see docs/design.md "Mask targets");
  * a full-image bitmap (what COCO evaluation and visualization want).

`crop_masks_to_boxes` goes from the second to the first (numpy, in the input pipeline); `paste_masks` goes from the
first to the second (JAX, jittable, at inference). Both are separable resamplings: every output pixel is
sum_{row, col} wy[y, row] * wx[x, col] * mask[row, col], so each is computed as two matmuls with per-axis weight
matrices instead of per-pixel gathers.

Boxes are XYXY in absolute pixels, float32, as everywhere in the library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mrcnn_jax.ops import roi_align as roi_align_ops

# Side of the GT mask crops stored per instance (docs/design.md: gt masks (B, G, M, M) uint8).
GT_MASK_SIZE = 112

PASTE_MODES = ("detectron2", "torchvision")


# --------------------------------------------------------------------------------------------------------------------
# Pasting predicted masks into the image (JAX).
# --------------------------------------------------------------------------------------------------------------------


def _torchvision_axis_weights(lo, hi, mask_size: int, image_size: int):
  """Interpolation weights of torchvision's `paste_masks_in_image(..., padding=1)` along one axis.

  lo, hi: (K,) float32 box edges along this axis (x1, x2 or y1, y2). Returns (K, image_size, mask_size) float32:
  row p holds the weights of the mask cells that image pixel p reads.

  torchvision pads the mask with one zero cell on each side, grows the box by (M + 2) / M about its centre so the
  padding lands outside the original box, truncates the box to integers, and resizes the padded mask to the
  inclusive integer box (size hi - lo + 1) with bilinear `F.interpolate(align_corners=False)`. The padding cells are
  zero, so their weights are simply dropped.
  """
  padded = mask_size + 2
  # float32 constants and the same order of operations as torchvision's `expand_boxes`, so that truncation to
  # integers falls on the same side.
  scale = np.float32(padded / mask_size)
  half = (hi - lo) * np.float32(0.5) * scale
  centre = (hi + lo) * np.float32(0.5)
  # float -> int conversion truncates toward zero, like torch's `.to(torch.int64)`.
  lo_i = (centre - half).astype(jnp.int32)
  hi_i = (centre + half).astype(jnp.int32)
  size = jnp.maximum(hi_i - lo_i + 1, 1)

  pix = jnp.arange(image_size, dtype=jnp.int32)
  dst = pix[None, :] - lo_i[:, None]  # (K, image_size): index into the resized mask
  # The resized mask covers pixels lo_i..hi_i (inclusive); an inverted integer box pastes nothing.
  inside = (pix[None, :] >= lo_i[:, None]) & (pix[None, :] <= hi_i[:, None])

  # F.interpolate(bilinear, align_corners=False): src = (dst + 0.5) * in / out - 0.5, clamped below at 0.
  ratio = np.float32(padded) / size.astype(jnp.float32)
  src = jnp.maximum(ratio[:, None] * (dst.astype(jnp.float32) + np.float32(0.5)) - np.float32(0.5), 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), padded - 1)
  lam = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  i1 = jnp.minimum(i0 + 1, padded - 1)

  # Padded cell p is mask cell p - 1.
  cells = jnp.arange(1, mask_size + 1, dtype=jnp.int32)
  w = (1.0 - lam)[..., None] * (i0[..., None] == cells) + lam[..., None] * (i1[..., None] == cells)
  return jnp.where(inside[..., None], w, 0.0).astype(jnp.float32)


def _detectron2_axis_weights(lo, hi, mask_size: int, image_size: int):
  """Interpolation weights of Detectron2's `paste_masks_in_image` (`_do_paste_mask`) along one axis.

  lo, hi: (K,) float32 box edges along this axis. Returns (K, image_size, mask_size) float32.

  Detectron2 maps the centre of pixel p to g = (p + 0.5 - lo) / (hi - lo) * 2 - 1 and samples the mask there with
  `F.grid_sample(align_corners=False, padding_mode="zeros")`, i.e. at mask coordinate ((g + 1) * M - 1) / 2 with
  bilinear weights, cells outside the mask reading 0. On CPU it evaluates this only in the region
  [floor(lo) - 1, ceil(hi) + 1) around the box (`skip_empty`) and leaves 0 elsewhere; we do the same, so that the
  small bilinear tails beyond that region are 0 here too. A box with hi <= lo pastes nothing (no division by 0).
  """
  valid = hi > lo
  extent = jnp.where(valid, hi - lo, 1.0)
  pix = jnp.arange(image_size, dtype=jnp.float32)
  # Same float32 expressions as Detectron2 (normalize, then grid_sample's unnormalize).
  g = (pix[None, :] + np.float32(0.5) - lo[:, None]) / extent[:, None] * np.float32(2.0) - np.float32(1.0)
  src = ((g + np.float32(1.0)) * np.float32(mask_size) - np.float32(1.0)) / np.float32(2.0)
  i0f = jnp.floor(src)
  lam = src - i0f
  i0 = i0f.astype(jnp.int32)

  cells = jnp.arange(mask_size, dtype=jnp.int32)
  # Corners outside [0, M - 1] never match a cell, which is grid_sample's zero padding.
  w = (1.0 - lam)[..., None] * (i0[..., None] == cells) + lam[..., None] * ((i0 + 1)[..., None] == cells)

  region = (
      (pix[None, :] >= jnp.floor(lo)[:, None] - 1.0)
      & (pix[None, :] < jnp.ceil(hi)[:, None] + 1.0)
      & valid[:, None]
  )
  return jnp.where(region[..., None], w, 0.0).astype(jnp.float32)


def paste_masks(masks, boxes, image_hw: Sequence[int], threshold: float | None = 0.5, mode: str = "detectron2"):
  """Paste per-box mask probabilities into full-image masks.

  masks: (K, M, M) float, mask probabilities on the box's grid (e.g. the mask head's 28 x 28 sigmoid output for
    the predicted class).
  boxes: (K, 4) float32 XYXY, absolute pixels of the image the masks are pasted into.
  image_hw: static (H, W) ints, the output image size.
  threshold: binarization threshold, or None to return the resampled probabilities.
  mode: "detectron2" (default) or "torchvision": which library's resampling to reproduce.
    * "detectron2": Detectron2's `paste_masks_in_image` (bilinear `grid_sample` of the mask over the box, pixel
      centres at +0.5); binarized with `>= threshold`.
    * "torchvision": `torchvision.models.detection.roi_heads.paste_masks_in_image(masks[:, None], boxes, (H, W),
      padding=1)[:, 0]` (zero-pad the mask, grow and truncate the box, bilinear resize onto the inclusive integer
      box); binarized with `> threshold`, as torchvision's references compare masks > 0.5.
  Returns (K, H, W) bool when `threshold` is set, else (K, H, W) float32 in [0, 1]. Pixels no mask reaches are
  0 / False, including everything of a degenerate or outside-the-image box.

  Static shapes throughout, so it can be jitted with `image_hw`, `threshold` and `mode` static, e.g.
  `jax.jit(paste_masks, static_argnums=(2, 3, 4))`. Cost is two batched matmuls, K * H * M * W multiply-adds for
  the larger one; the output itself (K * H * W) is usually what dominates memory.
  """
  if mode not in PASTE_MODES:
    raise ValueError(f"mode must be one of {PASTE_MODES}, got {mode!r}")
  height, width = (int(s) for s in image_hw)
  masks = jnp.asarray(masks, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  mask_h, mask_w = masks.shape[-2:]
  if mask_h != mask_w:
    # torchvision's padding scale uses the last dimension for both axes; keep the two modes on the same contract.
    raise ValueError(f"masks must be square (K, M, M), got {masks.shape}")

  axis_weights = _torchvision_axis_weights if mode == "torchvision" else _detectron2_axis_weights
  wy = axis_weights(boxes[:, 1], boxes[:, 3], mask_h, height)  # (K, H, M)
  wx = axis_weights(boxes[:, 0], boxes[:, 2], mask_w, width)  # (K, W, M)

  # Columns first (K*M*M*W) and rows second (K*H*M*W): the cheap contraction goes first, and torch's bilinear
  # resize (F.interpolate) also interpolates along x before y, which keeps values that sit on the threshold on the
  # same side as torchvision's.
  cols = jnp.einsum("kmn,kwn->kmw", masks, wx, precision=lax.Precision.HIGHEST)
  pasted = jnp.einsum("khm,kmw->khw", wy, cols, precision=lax.Precision.HIGHEST)

  if threshold is None:
    return pasted
  if mode == "torchvision":
    return pasted > threshold
  return pasted >= threshold


# --------------------------------------------------------------------------------------------------------------------
# Mask head targets from GT crops (JAX).
# --------------------------------------------------------------------------------------------------------------------


def mask_targets(
    gt_crops,
    gt_boxes,
    rois,
    matched_idx,
    out_size: int = 28,
    *,
    aligned: bool = True,
    sampling_ratio: int = 0,
    max_sampling_ratio: int = 4,
):
  """Training targets of the mask head: RoIAlign of each RoI's matched GT mask, read from the GT's M x M crop.

  Args:
    gt_crops: (G, M, M) uint8 in 0..255 (as `crop_masks_to_boxes` makes them) or float in [0, 1]; batched
      (B, G, M, M) works too, with every other argument batched alike.
    gt_boxes: (G, 4) XYXY, the boxes the crops cover.
    rois: (R, 4) XYXY, the (foreground) RoIs.
    matched_idx: (R,) int32 in [0, G), the GT each RoI is matched to.
    out_size: side of the targets (28 for Mask R-CNN).
    aligned: emulate RoIAlign on the full-image mask with aligned=True (Detectron2) or the legacy aligned=False
      (torchvision's `project_masks_on_boxes`).
    sampling_ratio, max_sampling_ratio: as in `roi_align`, counted in crop pixels. The default, adaptive up to
      4, samples every crop pixel of a RoI about as large as its GT box (crop pixels per bin = M / out_size = 4).

  Returns:
    (R, out_size, out_size) float32 soft targets in [0, 1] (threshold them for Detectron2's binary targets).

  The crop covers exactly its box, so an image coordinate e (pixel edges at integers) is e' = (e - x1) * M / w in
  the crop. The crop is padded with one zero pixel on each side, so samples that leave the box read 0 — the
  mask's true value there — rather than the border value RoIAlign would clamp to. A degenerate GT box
  (zero width or height) gives all-zero targets.
  """
  if gt_crops.ndim == 4:
    fn = functools.partial(
        mask_targets, out_size=out_size, aligned=aligned, sampling_ratio=sampling_ratio,
        max_sampling_ratio=max_sampling_ratio)
    return jax.vmap(fn)(gt_crops, gt_boxes, rois, matched_idx)
  num_gt, m, _ = gt_crops.shape
  if gt_crops.dtype == jnp.uint8:
    crops = gt_crops.astype(jnp.float32) / 255.0
  else:
    crops = gt_crops.astype(jnp.float32)
  crops = jnp.pad(crops, ((0, 0), (1, 1), (1, 1)))
  padded = m + 2

  rois = rois.astype(jnp.float32)
  gt = gt_boxes.astype(jnp.float32)[matched_idx]
  x1, y1, x2, y2 = (rois[:, i] for i in range(4))
  if not aligned:
    # The legacy op samples pixel values at integer coordinates and keeps RoIs at least 1 px: as an aligned
    # (pixel-edge) RoI, that is [x1 + 0.5, x1 + 0.5 + max(x2 - x1, 1)].
    x2 = x1 + 0.5 + jnp.maximum(x2 - x1, 1.0)
    y2 = y1 + 0.5 + jnp.maximum(y2 - y1, 1.0)
    x1 = x1 + 0.5
    y1 = y1 + 0.5
  gw = gt[:, 2] - gt[:, 0]
  gh = gt[:, 3] - gt[:, 1]
  ok = (gw > 0) & (gh > 0)
  sx = m / jnp.where(ok, gw, 1.0)
  sy = m / jnp.where(ok, gh, 1.0)
  crop_rois = jnp.stack(
      [(x1 - gt[:, 0]) * sx + 1, (y1 - gt[:, 1]) * sy + 1, (x2 - gt[:, 0]) * sx + 1, (y2 - gt[:, 1]) * sy + 1],
      axis=-1)
  crop_rois = jnp.where(ok[:, None], crop_rois, 0.0)
  ys, wy, xs, wx = roi_align_ops.roi_sample_points(
      crop_rois, out_size, 1.0, sampling_ratio, True, (padded, padded), max_sampling_ratio=max_sampling_ratio)
  base = matched_idx.astype(jnp.int32) * (padded * padded)
  idx, weights = roi_align_ops.combine_sample_points(ys, wy, xs, wx, padded, base)
  out = roi_align_ops.weighted_gather(crops.reshape(num_gt * padded * padded, 1), idx, weights, impl="xla")
  out = out.reshape(-1, out_size, out_size)
  return jnp.where(ok[:, None, None], jnp.clip(out, 0.0, 1.0), 0.0)



# --------------------------------------------------------------------------------------------------------------------
# Cropping GT masks to their boxes (numpy, host side).
# --------------------------------------------------------------------------------------------------------------------


def _roi_align_axis_weights(lo: float, hi: float, out_size: int, in_size: int):
  """Per-axis weights of RoIAlign (aligned=True, adaptive sampling) for one box.

  lo, hi: box edges along this axis (pixels), hi > lo; out_size: bins along the axis; in_size: image size along it.
  Returns (weights, first): weights (out_size, n) float32 over input rows first..first + n - 1, the only rows any
  sample reads; averaging the ceil(bin) samples of each bin is folded into the weights. Returns None when every
  sample falls beyond the image (RoIAlign reads 0 there).

  Follows torchvision's `roi_align` CPU kernel: the box starts at lo - 0.5 (pixel i covers [i, i + 1)); each bin
  of size (hi - lo) / out_size takes ceil(bin) evenly spaced samples; a sample below -1 or above in_size reads 0;
  samples in [-1, 0] are clamped to 0 and samples past in_size - 1 to in_size - 1.
  """
  # The bin size and the sample count in float32 like the kernel, so that ceil() picks the same count.
  start = np.float32(lo) - np.float32(0.5)
  bin_size = (np.float32(hi) - np.float32(0.5) - start) / np.float32(out_size)
  count = max(math.ceil(bin_size), 1)
  bins = np.arange(out_size, dtype=np.float64)[:, None]
  steps = (np.arange(count, dtype=np.float64)[None, :] + 0.5) * (float(bin_size) / count)
  pos = (float(start) + bins * float(bin_size) + steps).ravel()  # (out_size * count,)
  owner = np.repeat(np.arange(out_size), count)

  keep = (pos >= -1.0) & (pos <= in_size)
  if not keep.any():
    return None
  pos, owner = pos[keep], owner[keep]
  pos = np.maximum(pos, 0.0)
  low = pos.astype(np.int64)
  at_end = low >= in_size - 1
  low = np.where(at_end, in_size - 1, low)
  high = np.where(at_end, in_size - 1, low + 1)
  frac = np.where(at_end, 0.0, pos - low)

  first = int(low.min())
  n = int(high.max()) - first + 1
  # Sum the (sample, row) contributions into a dense (out_size, n) matrix; bincount does the scatter-add.
  weights = np.bincount(owner * n + (low - first), weights=(1.0 - frac) / count, minlength=out_size * n)
  weights += np.bincount(owner * n + (high - first), weights=frac / count, minlength=out_size * n)
  return weights.reshape(out_size, n).astype(np.float32), first


def crop_masks_to_boxes(masks, boxes, size: int = GT_MASK_SIZE):
  """Crop each instance's full-image mask to its own box and resample it to size x size.

  masks: (G, H, W) bool or uint8 numpy, binary full-image masks (nonzero = inside).
  boxes: (G, 4) numpy XYXY, absolute pixels of the same image.
  size: side M of the crops.
  Returns (G, M, M) uint8 numpy: the fraction of each crop cell the mask covers, times 255, rounded.

  The sampling is RoIAlign's (`torchvision.ops.roi_align(..., spatial_scale=1, sampling_ratio=0, aligned=True)`):
  half-pixel centres, and ceil(box_size / M) samples per bin along each axis, so a large box is averaged down rather
  than aliased. A box with zero or negative width or height gives an all-zero crop. The work per instance is two
  small matmuls over the mask rows and columns the box touches, M * h * w rather than M * H * W.
  """
  masks = np.asarray(masks)
  boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
  num, height, width = masks.shape
  if boxes.shape[0] != num:
    raise ValueError(f"got {num} masks and {boxes.shape[0]} boxes")
  crops = np.zeros((num, size, size), np.uint8)
  for i in range(num):
    x1, y1, x2, y2 = boxes[i]
    if not (x2 > x1 and y2 > y1):  # also rejects NaN
      continue
    rows = _roi_align_axis_weights(y1, y2, size, height)
    cols = _roi_align_axis_weights(x1, x2, size, width)
    if rows is None or cols is None:
      continue
    (wy, top), (wx, left) = rows, cols
    patch = masks[i, top : top + wy.shape[1], left : left + wx.shape[1]] != 0
    coverage = wy @ patch.astype(np.float32) @ wx.T
    crops[i] = np.clip(np.rint(coverage * 255.0), 0, 255).astype(np.uint8)
  return crops
