"""The box head of Fast R-CNN: two FC layers over 7x7 RoI features, class scores and class-specific box deltas.

Class layout inside the library: index 0 is background, 1..K the foreground classes, and the box predictor has
4 * (K + 1) outputs (the background slot unused). Converters re-order weights from frameworks that differ
(Detectron2 puts background last and has no background deltas).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from mrcnn_jax.modeling import layers
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import nms as nms_ops


class BoxHead(nn.Module):
  """(B, R, 7, 7, C) RoI features -> class logits (B, R, K+1) and deltas (B, R, 4*(K+1)), float32."""

  num_classes: int  # K, foreground only
  fc_dim: int = 1024
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, r = x.shape[:2]
    x = x.reshape(b, r, -1).astype(self.dtype)  # (h, w, c) order; torch weights (c, h, w) are permuted on conversion
    x = nn.relu(layers.Dense(self.fc_dim, dtype=self.dtype, name="fc1")(x))
    x = nn.relu(layers.Dense(self.fc_dim, dtype=self.dtype, name="fc2")(x))
    logits = layers.Dense(self.num_classes + 1, dtype=self.dtype, name="cls_score")(x)
    deltas = layers.Dense(4 * (self.num_classes + 1), dtype=self.dtype, name="bbox_pred")(x)
    return logits.astype(jnp.float32), deltas.astype(jnp.float32)


def detect(
    logits,
    deltas,
    proposals,
    proposal_valid,
    image_hw,
    *,
    score_thresh: float,
    nms_thresh: float,
    detections_per_image: int,
    min_box_size: float = 0.0,
    box_weights=box_ops.ROI_BOX_WEIGHTS,
):
  """Final detections, fixed-size (torchvision's postprocess_detections, Detectron2's fast_rcnn_inference).

  Args:
    logits: (B, R, K+1), background at 0; deltas: (B, R, 4*(K+1)); proposals: (B, R, 4); proposal_valid (B, R).
    image_hw: (B, 2) valid image height and width (boxes are clipped to it).
    score_thresh: candidates (proposal, class) need softmax score > score_thresh.
    min_box_size: if > 0, boxes narrower or lower are dropped (torchvision's 1e-2); 0 keeps all.

  Returns:
    dict of boxes (B, D, 4), scores (B, D), classes (B, D) int32 in 1..K, valid (B, D) bool, and
    proposal_index (B, D) int32 (the RoI each detection came from), D = detections_per_image.
  """
  num_classes = logits.shape[-1] - 1
  probs = jax.nn.softmax(logits, axis=-1)

  def per_image(probs, deltas, proposals, proposal_valid, hw):
    r = probs.shape[0]
    boxes = box_ops.decode_boxes(deltas, proposals, box_weights).reshape(r, num_classes + 1, 4)
    boxes = box_ops.clip_boxes(boxes, (hw[0], hw[1]))[:, 1:]  # drop the background column
    scores = probs[:, 1:]
    classes = jnp.broadcast_to(jnp.arange(1, num_classes + 1, dtype=jnp.int32), scores.shape)
    rois = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32)[:, None], scores.shape)
    valid = (scores > score_thresh) & proposal_valid[:, None]
    if min_box_size > 0:
      valid &= ((boxes[..., 2] - boxes[..., 0]) >= min_box_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_box_size)
    boxes, scores, classes, rois, valid = (x.reshape((r * num_classes,) + x.shape[2:])
                                          for x in (boxes, scores, classes, rois, valid))
    keep = nms_ops.batched_nms(boxes, scores, classes, nms_thresh, detections_per_image, valid=valid)
    ok = keep >= 0
    safe = jnp.where(ok, keep, 0)
    return {
        "boxes": jnp.where(ok[:, None], boxes[safe], 0.0),
        "scores": jnp.where(ok, scores[safe], 0.0),
        "classes": jnp.where(ok, classes[safe], 0),
        "valid": ok,
        "proposal_index": jnp.where(ok, rois[safe], 0),
    }

  return jax.vmap(per_image)(probs, deltas, proposals, proposal_valid, image_hw)
