"""Greedy non-maximum suppression with static shapes: plain `nms` and class-aware `batched_nms`.

Both return a fixed number of indices, padded with -1, so that they can sit inside a jitted program. The result
equals torchvision's CPU `nms` / `batched_nms`: boxes are visited in decreasing score order (a stable sort, so
equal scores go in increasing index order) and a box is dropped when its IoU with an already kept box is strictly
greater than the threshold.

How it stays fast and memory-bounded: the boxes are sorted once and visited in tiles of `tile_size` boxes. Each
tile is compared with the buffer of boxes kept so far (at most tile_size x max_output_size IoUs, read in chunks up
to the filled part of the buffer; never N x N), then with itself, and its survivors are appended to the buffer.
The loop stops as soon as max_output_size boxes are kept or the valid boxes run out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mrcnn_jax.ops.boxes import box_iou


def nms(boxes, scores, iou_threshold, max_output_size: int, *, valid=None, tile_size: int = 256):
  """Greedy NMS with a fixed-size output.

  Args:
    boxes: (N, 4) float32 XYXY. Two boxes whose union is empty (zero-area copies) never suppress each other, as
      in torchvision (where their IoU is NaN).
    scores: (N,) float. Boxes whose score is -inf or NaN are padding.
    iou_threshold: Python float or traced float32 scalar; a box is suppressed by a kept box when their IoU is
      strictly greater. A Python float is compared as torchvision's CPU kernel does (float32 IoU against the
      double threshold); an array (e.g. traced) scalar is compared in float32.
    max_output_size: static number of indices returned.
    valid: optional (N,) bool; False marks padding, which is never kept and never suppresses anything.
    tile_size: static number of boxes processed per step.

  Returns:
    (max_output_size,) int32: indices into `boxes` of the kept boxes in decreasing score order, then -1.
  """
  threshold = _float32_threshold(iou_threshold)
  return _nms_core(boxes, scores, None, threshold, valid, max_output_size=max_output_size, tile_size=tile_size)


def batched_nms(boxes, scores, idxs, iou_threshold, max_output_size: int, *, valid=None, tile_size: int = 256):
  """Class-aware greedy NMS: boxes suppress each other only within the same class.

  Same arguments and result as `nms`, plus idxs: (N,) int class ids. The result equals running `nms` on each
  class separately and merging by score (ties by index), as torchvision's `batched_nms`. Instead of torchvision's
  trick of offsetting each class's boxes far apart (which loses float32 precision at large offsets), IoUs
  between boxes of different classes are ignored.

  Returns:
    (max_output_size,) int32: indices of the kept boxes in decreasing score order, then -1.
  """
  threshold = _float32_threshold(iou_threshold)
  return _nms_core(boxes, scores, idxs, threshold, valid, max_output_size=max_output_size, tile_size=tile_size)


def _float32_threshold(iou_threshold):
  """The float32 t with (x > t) == (x > iou_threshold) for every float32 x, iou_threshold read as a double.

  torchvision's CPU kernel compares the float32 IoU with the threshold in double precision; rounding 0.3 to
  float32 rounds it up, and an IoU of exactly float32(0.3) (e.g. 3 / 10) would then survive here but not there.
  Rounding the threshold down to the float32 below it keeps the two in step.
  """
  if isinstance(iou_threshold, (int, float, np.floating, np.integer)):
    t = np.float32(iou_threshold)
    if float(t) > float(iou_threshold):
      t = np.nextafter(t, np.float32(-np.inf))
    return jnp.float32(t)
  return jnp.asarray(iou_threshold, jnp.float32)


# Jitted on its own (the threshold traced) so that eager calls compile once per shape, not once per call and
# threshold; inside a caller's jit it is simply inlined.
@functools.partial(jax.jit, static_argnames=("max_output_size", "tile_size"))
def _nms_core(boxes, scores, classes, threshold, valid, *, max_output_size, tile_size):
  """Shared body of `nms` (classes None) and `batched_nms` (classes (N,) int). threshold: float32 scalar.

  Returns (max_output_size,) int32.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores)
  n = boxes.shape[0]
  k = int(max_output_size)
  if n == 0 or k == 0:
    return jnp.full((k,), -1, jnp.int32)

  tile = max(1, min(int(tile_size), n))
  num_tiles = -(-n // tile)
  sorted_boxes, sorted_classes, order, num_valid = _sort_by_score(boxes, scores, classes, valid, num_tiles * tile)
  # The buffer of kept boxes is read in chunks so that a tile is compared with the filled rows only: the work is
  # about tile x (boxes kept so far), not tile x max_output_size.
  chunk = min(tile, k)
  buffer_size = -(-k // chunk) * chunk
  in_tile = jnp.arange(tile, dtype=jnp.int32)

  def process_tile(state):
    t, count, kept_boxes, kept_classes, kept_index = state
    start = t * tile
    tile_boxes = lax.dynamic_slice_in_dim(sorted_boxes, start, tile)
    tile_valid = (start + in_tile) < num_valid
    tile_classes = None if sorted_classes is None else lax.dynamic_slice_in_dim(sorted_classes, start, tile)
    # (1) Suppressed by a box kept in an earlier tile; (2) greedy suppression inside the tile.
    suppressed = _suppressed_by_kept(tile_boxes, tile_classes, tile_valid, kept_boxes, kept_classes, count,
                                     threshold, chunk)
    keep = _greedy_in_tile(tile_boxes, tile_classes, ~suppressed, threshold)
    # (3) Append the survivors in order; positions past the buffer are dropped by the scatter.
    slot = count + jnp.cumsum(keep, dtype=jnp.int32) - 1
    slot = jnp.where(keep & (slot < k), slot, buffer_size)
    kept_boxes = kept_boxes.at[slot].set(tile_boxes, mode="drop")
    if tile_classes is not None:
      kept_classes = kept_classes.at[slot].set(tile_classes, mode="drop")
    kept_index = kept_index.at[slot].set(lax.dynamic_slice_in_dim(order, start, tile), mode="drop")
    count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), k)
    return t + 1, count, kept_boxes, kept_classes, kept_index

  def more_to_do(state):
    t, count = state[0], state[1]
    return (t < num_tiles) & (count < k) & (t * tile < num_valid)

  init = (
      jnp.int32(0),
      jnp.int32(0),
      jnp.zeros((buffer_size, 4), jnp.float32),
      jnp.zeros((buffer_size,), jnp.int32),
      jnp.full((buffer_size,), -1, jnp.int32),
  )
  return lax.while_loop(more_to_do, process_tile, init)[-1][:k]


def _sort_by_score(boxes, scores, classes, valid, padded_size: int):
  """The boxes (and classes) in decreasing score order, padded to `padded_size` rows.

  Returns (sorted_boxes (P, 4), sorted_classes (P,) int32 or None, order (P,) int32: the input index of each row, -1
  in the padding, num_valid () int32: the valid boxes, which are the first rows).
  """
  n = boxes.shape[0]
  # NaN > -inf is False, so this also drops NaN scores.
  is_valid = scores > -jnp.inf
  if valid is not None:
    is_valid = is_valid & jnp.asarray(valid, bool)
  num_valid = jnp.sum(is_valid, dtype=jnp.int32)

  # One stable ascending sort of -score puts equal scores in index order, as torchvision's CPU kernel does, and
  # sends padding (key +inf) to the end, so the valid boxes are a prefix of the sorted order.
  key = jnp.where(is_valid, -scores.astype(jnp.float32), jnp.inf)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)

  pad = padded_size - n
  sorted_boxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
  sorted_classes = None if classes is None else jnp.pad(jnp.asarray(classes, jnp.int32)[order], (0, pad))
  order = jnp.pad(order, (0, pad), constant_values=-1)
  return sorted_boxes, sorted_classes, order, num_valid


def _suppressed_by_kept(tile_boxes, tile_classes, tile_valid, kept_boxes, kept_classes, count, threshold,
                        chunk: int):
  """(T,) bool: which boxes of the tile are padding or overlap (IoU > threshold, same class) one of the first `count`
  kept boxes. Reads the kept buffer `chunk` rows at a time, and stops once the filled rows are read or every box of
  the tile is suppressed."""
  in_chunk = jnp.arange(chunk, dtype=jnp.int32)

  def compare_chunk(carry):
    c, suppressed = carry
    chunk_start = c * chunk
    chunk_boxes = lax.dynamic_slice_in_dim(kept_boxes, chunk_start, chunk)
    over = (box_iou(tile_boxes, chunk_boxes) > threshold) & ((chunk_start + in_chunk) < count)[None, :]
    if tile_classes is not None:
      chunk_classes = lax.dynamic_slice_in_dim(kept_classes, chunk_start, chunk)
      over = over & (tile_classes[:, None] == chunk_classes[None, :])
    return c + 1, suppressed | jnp.any(over, axis=1)

  def more_chunks(carry):
    c, suppressed = carry
    return (c * chunk < count) & jnp.any(tile_valid & ~suppressed)

  _, suppressed = lax.while_loop(more_chunks, compare_chunk, (jnp.int32(0), ~tile_valid))
  return suppressed


def _greedy_in_tile(tile_boxes, tile_classes, candidate, threshold):
  """(T,) bool: the candidates that greedy NMS keeps within the tile, visiting its boxes in order.

  Greedy NMS keeps i iff i is a candidate and no kept j < i overlaps it. As the relation only looks at earlier
  boxes, x <- candidate & ~any(A & x) has a unique fixed point (box i settles by step i), so iterating until nothing
  changes gives the greedy answer, usually in a few steps.
  """
  in_tile = jnp.arange(tile_boxes.shape[0], dtype=jnp.int32)
  earlier = in_tile[:, None] > in_tile[None, :]  # box i can only be suppressed by an earlier box j < i
  a = (box_iou(tile_boxes, tile_boxes) > threshold) & earlier
  if tile_classes is not None:
    a = a & (tile_classes[:, None] == tile_classes[None, :])

  def settle(carry):
    keep, _ = carry
    new_keep = candidate & ~jnp.any(a & keep[None, :], axis=1)
    return new_keep, jnp.any(new_keep != keep)

  keep, _ = lax.while_loop(lambda carry: carry[1], settle, (candidate, jnp.array(True)))
  return keep
