"""Training targets and losses of Mask R-CNN, as pure functions with static shapes (Detectron2's names).

- RPN: anchors matched to ground truth (IoU 0.3 / 0.7 with low-quality matches), a fixed number sampled per image;
  `loss_rpn_cls` (binary cross-entropy) and `loss_rpn_loc` (smooth L1 / L1 on the deltas of positive anchors).
- RoI heads: proposals plus the ground-truth boxes, matched at IoU 0.5, 512 sampled per image at 25% foreground;
  `loss_cls` (softmax cross-entropy) and `loss_box_reg` (class-specific deltas, foreground only); `loss_mask`
  (per-pixel sigmoid cross-entropy on the ground-truth class's 28x28 map, foreground RoIs only); `loss_keypoint`
  (softmax cross-entropy over the 56x56 positions of each visible keypoint inside its RoI, mean over them).

Crowd boxes and padded ground truth never take part in matching. Normalization follows the config's
`loss_convention`: "detectron2" divides the RPN losses by the number of anchors that could be sampled
(batch_size_per_image x images) and trains masks on binary targets; "torchvision" divides by the number actually
sampled and trains masks on the soft RoIAlign values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import masks as mask_ops
from mrcnn_jax.ops import matching

CONVENTIONS = ("detectron2", "torchvision")


def smooth_l1(x, beta: float):
  """Elementwise smooth L1 (Huber / beta): 0.5 x^2 / beta below beta, |x| - beta / 2 above; beta == 0 is L1."""
  if beta == 0:
    return jnp.abs(x)
  return optax.huber_loss(x, delta=beta) / beta


# ------------------------------------------------------------------------------------------------------------------
# RPN
# ------------------------------------------------------------------------------------------------------------------


def rpn_targets(key, anchors, gt_boxes, gt_matchable, *, matcher: matching.Matcher, batch_size_per_image: int,
                positive_fraction: float, box_weights, anchor_valid=None):
  """Anchor labels, sampled anchors and regression targets of one image.

  anchors: (N, 4); gt_boxes: (G, 4); gt_matchable: (G,) bool (valid and not crowd); anchor_valid: optional (N,)
  bool, False for anchors outside the image's frame (`ops.frames`): they are neither positive nor negative, and
  never the best match of a ground truth (low-quality matches), as if the image's grid ended at its frame.
  Returns sampled indices (S,) int32, sampled_valid (S,) bool, sampled_labels (S,) float32 in {0, 1},
  target deltas (S, 4) of the sampled anchors (meaningful where the label is 1), with S = batch_size_per_image.
  """
  anchors = jnp.asarray(anchors)  # a numpy array (shared anchors) becomes a constant of the program
  quality = box_ops.box_iou(gt_boxes, anchors)
  if anchor_valid is not None:
    quality = jnp.where(anchor_valid[None, :], quality, -1.0)
  matches, labels = matcher(quality, gt_matchable)
  idx, valid = matching.sample_balanced(key, labels, batch_size_per_image, positive_fraction, valid=anchor_valid)
  sampled_labels = (labels[idx] == 1).astype(jnp.float32)
  deltas = box_ops.encode_boxes(gt_boxes[matches[idx]], anchors[idx], box_weights)
  return idx, valid, sampled_labels, deltas


def rpn_losses(objectness, deltas, sampled_idx, sampled_valid, sampled_labels, target_deltas, *,
               batch_size_per_image: int, smooth_l1_beta: float, convention: str):
  """loss_rpn_cls and loss_rpn_loc of a batch.

  objectness: (B, N) logits; deltas: (B, N, 4); the sampled arrays (B, S) / (B, S, 4) from `rpn_targets`.
  """
  logits = jnp.take_along_axis(objectness, sampled_idx, axis=1)
  pred = jnp.take_along_axis(deltas, sampled_idx[..., None], axis=1)
  weight = sampled_valid.astype(jnp.float32)
  cls = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, sampled_labels) * weight)
  positive = weight * sampled_labels
  loc = jnp.sum(jnp.sum(smooth_l1(pred - target_deltas, smooth_l1_beta), axis=-1) * positive)
  if convention == "detectron2":
    normalizer = float(batch_size_per_image * objectness.shape[0])
  elif convention == "torchvision":
    normalizer = jnp.maximum(jnp.sum(weight), 1.0)
  else:
    raise ValueError(f"loss convention {convention!r} is not one of {CONVENTIONS}")
  return {"loss_rpn_cls": cls / normalizer, "loss_rpn_loc": loc / normalizer}


# ------------------------------------------------------------------------------------------------------------------
# RoI heads
# ------------------------------------------------------------------------------------------------------------------


def sample_rois(key, proposals, proposal_valid, gt_boxes, gt_classes, gt_matchable, *, iou_threshold: float,
                batch_size_per_image: int, positive_fraction: float, append_gt: bool, box_weights):
  """RoIs of one image for the box (and mask) heads, foreground first.

  proposals: (P, 4), proposal_valid (P,); gt_boxes (G, 4), gt_classes (G,) int32 labels 1..K, gt_matchable (G,).
  Returns dict: rois (S, 4), valid (S,), classes (S,) int32 (0 = background), matched (S,) int32 gt index,
  target_deltas (S, 4), S = batch_size_per_image. The first int(S * positive_fraction) slots hold every sampled
  foreground RoI (the mask head's inputs).
  """
  if append_gt:  # the ground truth itself is a proposal, so every object has a well-placed foreground RoI
    proposals = jnp.concatenate([proposals, gt_boxes], axis=0)
    proposal_valid = jnp.concatenate([proposal_valid, gt_matchable], axis=0)
  quality = box_ops.box_iou(gt_boxes, proposals)
  matcher = matching.Matcher((iou_threshold,), (0, 1), False)
  matches, labels = matcher(quality, gt_matchable)
  idx, valid = matching.sample_balanced(key, labels, batch_size_per_image, positive_fraction, valid=proposal_valid)
  rois = proposals[idx]
  matched = matches[idx]
  foreground = valid & (labels[idx] == 1)
  return {
      "rois": jax.lax.stop_gradient(rois),
      "valid": valid,
      "classes": jnp.where(foreground, gt_classes[matched], 0).astype(jnp.int32),
      "matched": matched,
      "target_deltas": box_ops.encode_boxes(gt_boxes[matched], rois, box_weights),
  }


def fast_rcnn_losses(logits, deltas, samples, *, smooth_l1_beta: float):
  """loss_cls (mean over sampled RoIs) and loss_box_reg (foreground, summed, / sampled RoIs), of a batch.

  logits: (B, S, K+1); deltas: (B, S, 4(K+1)); samples: `sample_rois` output batched (B, S, ...).
  """
  weight = samples["valid"].astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, samples["classes"])
  loss_cls = jnp.sum(ce * weight) / count
  b, s = samples["classes"].shape
  per_class = deltas.reshape(b, s, -1, 4)
  pred = jnp.take_along_axis(per_class, samples["classes"][..., None, None], axis=2)[:, :, 0]
  foreground = weight * (samples["classes"] > 0)
  reg = jnp.sum(smooth_l1(pred - samples["target_deltas"], smooth_l1_beta), axis=-1)
  return {"loss_cls": loss_cls, "loss_box_reg": jnp.sum(reg * foreground) / count}


def mask_loss(mask_logits, rois, classes, matched, foreground, gt_crops, gt_boxes, *, convention: str,
              sampling_ratio: int = 0):
  """loss_mask: sigmoid cross-entropy on each foreground RoI's ground-truth class channel, mean over its pixels.

  mask_logits: (B, F, 28, 28, K+1); rois (B, F, 4); classes (B, F) int32; matched (B, F); foreground (B, F) bool;
  gt_crops (B, G, M, M) uint8; gt_boxes (B, G, 4).
  """
  size = mask_logits.shape[2]
  targets = mask_ops.mask_targets(gt_crops, gt_boxes, rois, matched, size,
                                  aligned=convention == "detectron2", sampling_ratio=sampling_ratio)
  if convention == "detectron2":
    targets = (targets >= 0.5).astype(jnp.float32)
  logits = jnp.take_along_axis(mask_logits, classes[..., None, None, None], axis=-1)[..., 0]
  per_pixel = optax.sigmoid_binary_cross_entropy(logits, jax.lax.stop_gradient(targets))
  weight = foreground.astype(jnp.float32)[..., None, None]
  count = jnp.maximum(jnp.sum(foreground.astype(jnp.float32)) * size * size, 1.0)
  return {"loss_mask": jnp.sum(per_pixel * weight) / count}


# ------------------------------------------------------------------------------------------------------------------
# Keypoints
# ------------------------------------------------------------------------------------------------------------------

KEYPOINT_NORMALIZERS = ("visible",)


def keypoint_targets(keypoints, rois, heatmap_size: int = 56):
  """Heatmap targets of keypoints in their RoIs: torchvision's `keypoints_to_heatmap` (= Detectron2's), static shapes.

  Each keypoint maps to the heatmap cell floor((p - roi_min) * S / roi_size) per axis; one lying exactly on the RoI's
  right (bottom) edge goes to the last column (row). It is a target where that cell is inside the S x S map and the
  keypoint is labeled (visibility > 0). The RoIs' own validity (padding, background) is the caller's to AND in.

  Args:
    keypoints: (..., R, K, 3) float32 (x, y, visibility) of the ground truth matched to each RoI, in image pixels.
    rois: (..., R, 4) XYXY, same leading dims.
    heatmap_size: S.
  Returns:
    targets (..., R, K) int32 flat index y * S + x in [0, S * S) (0 where not valid, as torchvision), and
    valid (..., R, K) bool.
  """
  s = heatmap_size
  keypoints = jax.lax.stop_gradient(jnp.asarray(keypoints, jnp.float32))
  rois = jax.lax.stop_gradient(jnp.asarray(rois, jnp.float32))
  x1, y1, x2, y2 = (rois[..., i, None] for i in range(4))

  def cell(p, lo, hi):
    # Same float32 operations in the same order as torchvision (scale first, then (p - lo) * scale), so floor
    # rounds identically near cell borders. Kept in float: a degenerate RoI gives inf / NaN, which the range
    # check below rejects (NaN compares false) where an integer cast would be undefined.
    c = jnp.floor((p - lo) * (s / (hi - lo)))
    return jnp.where(p == hi, float(s - 1), c)

  x = cell(keypoints[..., 0], x1, x2)
  y = cell(keypoints[..., 1], y1, y2)
  valid = (x >= 0) & (y >= 0) & (x < s) & (y < s) & (keypoints[..., 2] > 0)
  xi = jnp.where(valid, x, 0.0).astype(jnp.int32)
  yi = jnp.where(valid, y, 0.0).astype(jnp.int32)
  return yi * s + xi, valid


def keypoint_loss(heatmap_logits, targets, valid, *, normalizer="visible"):
  """loss_keypoint: softmax cross-entropy over the S x S positions of each valid (RoI, keypoint) heatmap.

  normalizer "visible" (Detectron2's default, and torchvision's only behaviour) divides the sum by the number of
  valid keypoints in the batch, i.e. the mean over them. A number n is Detectron2's fixed normalization
  (NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS=False, n = num_keypoints * batch_size_per_image * positive_fraction): the
  sum is divided by B * n. No valid keypoint at all gives 0 (and zero gradients), as both references.

  Args:
    heatmap_logits: (B, F, S, S, K) (`KeypointHead` layout, NHWC); any float dtype, computed in float32.
    targets: (B, F, K) int32 flat index y * S + x, from `keypoint_targets`.
    valid: (B, F, K) bool: labeled keypoints inside their RoI, of foreground RoIs only.
  Returns:
    {"loss_keypoint": scalar float32}.
  """
  b, f, s, s2, k = heatmap_logits.shape
  if s != s2:
    raise ValueError(f"keypoint heatmaps must be square, got {s}x{s2}")
  # Reduce over the flattened spatial axis in place instead of transposing to (B, F, K, S*S): the heatmaps are
  # the largest activations of the keypoint branch and a transpose would copy them.
  logits = heatmap_logits.reshape(b, f, s * s, k).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=2)  # (B, F, K)
  picked = jnp.take_along_axis(logits, targets[:, :, None, :].astype(jnp.int32), axis=2)[:, :, 0]
  total = jnp.sum(jnp.where(valid, lse - picked, 0.0))
  if isinstance(normalizer, str):
    if normalizer != "visible":
      raise ValueError(f"keypoint loss normalizer {normalizer!r} is not one of {KEYPOINT_NORMALIZERS} or a number")
    count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  else:
    count = float(normalizer) * b
    if not count > 0:
      raise ValueError(f"keypoint loss normalizer must be positive, got {normalizer!r}")
  return {"loss_keypoint": total / count}
