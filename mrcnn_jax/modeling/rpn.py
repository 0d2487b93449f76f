"""Region Proposal Network (Ren et al., 2015): the head, and proposals with static shapes."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from mrcnn_jax.modeling import layers
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import frames as frame_ops
from mrcnn_jax.ops import nms as nms_ops


class RPNHead(nn.Module):
  """A shared 3x3 conv, then per anchor an objectness logit and 4 box deltas, on every level.

  Returns (objectness, deltas): lists over levels of (B, H_l*W_l*A) and (B, H_l*W_l*A, 4), flattened in the order
  (y, x, anchor) of `ops.anchors.generate_anchors`.
  """

  num_anchors: int
  channels: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence, frames=None, strides: Sequence[int] | None = None):
    shared = layers.conv(self.channels, 3, name="conv", dtype=self.dtype)
    objectness = layers.conv(self.num_anchors, 1, name="objectness", dtype=self.dtype)
    deltas = layers.conv(4 * self.num_anchors, 1, name="deltas", dtype=self.dtype)
    logits, box_deltas = [], []
    strides = strides or [2 ** (2 + i) for i in range(len(features))]
    for x, stride in zip(features, strides):
      b = x.shape[0]
      t = nn.relu(shared(frame_ops.mask_to_frame(x, frames, stride)))
      logits.append(objectness(t).astype(jnp.float32).reshape(b, -1))
      box_deltas.append(deltas(t).astype(jnp.float32).reshape(b, -1, 4))
    return logits, box_deltas


def _keep_size(boxes, min_size: float):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  if min_size > 0:  # torchvision's remove_small_boxes: w >= min_size and h >= min_size
    return (w >= min_size) & (h >= min_size)
  return (w > 0) & (h > 0)  # Detectron2's Boxes.nonempty()


def generate_proposals(
    objectness: Sequence,
    deltas: Sequence,
    anchors: Sequence,
    image_hw,
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_size: float,
    score_thresh: float | None = None,
    box_weights=box_ops.RPN_BOX_WEIGHTS,
    sigmoid_scores: bool = False,
    anchor_valid: Sequence | None = None,
):
  """Proposals of one batch, fixed-size: torchvision's RPN.filter_proposals and Detectron2's find_top_rpn_proposals.

  Args:
    objectness: per level (B, N_l) logits; deltas: per level (B, N_l, 4); anchors: per level (N_l, 4) or
      (B, N_l, 4) XYXY (shared, or each image's own: `ops.anchors.frame_anchors`).
    anchor_valid: optional, per level (B, N_l) bool: anchors outside an image's frame, which take no part in the
      top-k, NMS or the output (as if the image's grid ended at its frame).
    image_hw: (B, 2) valid (unpadded) image height and width; boxes are clipped to it.
    pre_nms_topk: per level, the top scoring anchors kept before NMS.
    post_nms_topk: per image, proposals kept after NMS (over all levels, each level suppressed on its own).
    min_size: proposals narrower or lower than this are dropped (see `_keep_size`: 0 means non-empty).
    score_thresh: proposals whose score (sigmoid probability) is below it are dropped (torchvision's 0.0).
    sigmoid_scores: rank with sigmoid probabilities, as torchvision (ties when logits saturate) rather than logits.

  Returns:
    boxes (B, post_nms_topk, 4), scores (B, post_nms_topk) (the ranking scores), valid (B, post_nms_topk) bool.
    Slots past the kept proposals hold zero boxes, valid False.
  """
  cand_boxes, cand_scores, cand_levels, cand_valid = [], [], [], []
  for level, (logits, d, a) in enumerate(zip(objectness, deltas, anchors)):
    k = min(pre_nms_topk, logits.shape[1])
    if anchor_valid is not None:
      logits = jnp.where(anchor_valid[level], logits, -jnp.inf)
    top, idx = jax.lax.top_k(logits, k)
    sel_deltas = jnp.take_along_axis(d, idx[..., None], axis=1)
    a = jnp.asarray(a)
    sel_anchors = a[idx] if a.ndim == 2 else jnp.take_along_axis(a, idx[..., None], axis=1)
    cand_boxes.append(box_ops.decode_boxes(sel_deltas, sel_anchors, box_weights))
    cand_scores.append(top)
    cand_levels.append(jnp.full(top.shape, level, jnp.int32))
    cand_valid.append(jnp.ones(top.shape, bool) if anchor_valid is None
                      else jnp.take_along_axis(anchor_valid[level], idx, axis=1))
  boxes = jnp.concatenate(cand_boxes, axis=1)
  scores = jnp.concatenate(cand_scores, axis=1)
  levels = jnp.concatenate(cand_levels, axis=1)
  in_frame = jnp.concatenate(cand_valid, axis=1)
  if sigmoid_scores:
    scores = jax.nn.sigmoid(scores)

  def per_image(boxes, scores, levels, in_frame, hw):
    boxes = box_ops.clip_boxes(boxes, (hw[0], hw[1]))
    valid = in_frame & _keep_size(boxes, min_size) & jnp.all(jnp.isfinite(boxes), axis=-1) & jnp.isfinite(scores)
    if score_thresh is not None:
      probs = scores if sigmoid_scores else jax.nn.sigmoid(scores)
      valid &= probs >= score_thresh
    keep = nms_ops.batched_nms(boxes, scores, levels, nms_thresh, post_nms_topk, valid=valid)
    ok = keep >= 0
    safe = jnp.where(ok, keep, 0)
    return (jnp.where(ok[:, None], boxes[safe], 0.0), jnp.where(ok, scores[safe], -jnp.inf), ok)

  return jax.vmap(per_image)(boxes, scores, levels, in_frame, image_hw)
