"""Box arithmetic: areas, IoU, clipping, the Faster R-CNN box coder, format conversion.

Inside the library every box is XYXY in absolute pixels, float32: (x1, y1, x2, y2) with x2 >= x1 for a real box.
Widths are x2 - x1 (no "+1"), as in torchvision and Detectron2. Conversion to COCO's XYWH happens at the edges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

# Largest log-ratio a decoded width or height may take: exp(dw) <= 1000 / 16 (Detectron2 and torchvision).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# Box coder weights (wx, wy, ww, wh) of the two stages.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def box_area(boxes):
  """Area of XYXY boxes. boxes: (..., 4) -> (...). Inverted boxes give a negative area, as in torchvision."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
  """Pairwise IoU. boxes1: (N, 4), boxes2: (M, 4) XYXY -> (N, M) float32.

  Pairs whose union is empty (both boxes of zero area, e.g. padding) get IoU 0 rather than NaN.
  The arithmetic follows torchvision's `box_iou` so that thresholds (NMS, matching) cut at the same place.
  """
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.clip(rb - lt, min=0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1[:, None] + area2[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def clip_boxes(boxes, image_hw):
  """Clip XYXY boxes to an image. boxes: (..., 4); image_hw: (height, width), scalars or arrays broadcastable
  to boxes[..., 0] (e.g. per-image valid sizes of shape (B, 1)). Coordinates end in [0, width] x [0, height]."""
  height, width = image_hw
  height = jnp.asarray(height, boxes.dtype)
  width = jnp.asarray(width, boxes.dtype)
  x1 = jnp.clip(boxes[..., 0], 0, width)
  y1 = jnp.clip(boxes[..., 1], 0, height)
  x2 = jnp.clip(boxes[..., 2], 0, width)
  y2 = jnp.clip(boxes[..., 3], 0, height)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def encode_boxes(target, reference, weights: Sequence[float]):
  """Deltas (dx, dy, dw, dh) that take `reference` boxes to `target` boxes.

  target, reference: (N, 4) XYXY (any leading shape, matching). weights: (wx, wy, ww, wh).
  Returns (N, 4) float32: dx = wx * (cx_t - cx_r) / w_r, dw = ww * log(w_t / w_r), likewise for y/h.
  """
  wx, wy, ww, wh = weights
  rw = reference[..., 2] - reference[..., 0]
  rh = reference[..., 3] - reference[..., 1]
  rx = reference[..., 0] + 0.5 * rw
  ry = reference[..., 1] + 0.5 * rh
  tw = target[..., 2] - target[..., 0]
  th = target[..., 3] - target[..., 1]
  tx = target[..., 0] + 0.5 * tw
  ty = target[..., 1] + 0.5 * th
  dx = wx * (tx - rx) / rw
  dy = wy * (ty - ry) / rh
  dw = ww * jnp.log(tw / rw)
  dh = wh * jnp.log(th / rh)
  return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(deltas, reference, weights: Sequence[float]):
  """Apply deltas to reference boxes (the inverse of `encode_boxes`).

  deltas: (N, 4) or class-specific (N, K*4) laid out [dx0, dy0, dw0, dh0, dx1, ...]; reference: (N, 4) XYXY
  (any leading shape, matching). Returns boxes of the shape of `deltas`. dw and dh are clamped at
  log(1000/16) before the exponential so that a wild regression cannot overflow.
  """
  wx, wy, ww, wh = weights
  reference = reference.astype(deltas.dtype)
  widths = reference[..., 2] - reference[..., 0]
  heights = reference[..., 3] - reference[..., 1]
  ctr_x = reference[..., 0] + 0.5 * widths
  ctr_y = reference[..., 1] + 0.5 * heights
  d = deltas.reshape(deltas.shape[:-1] + (-1, 4))
  dx = d[..., 0] / wx
  dy = d[..., 1] / wy
  dw = jnp.minimum(d[..., 2] / ww, BBOX_XFORM_CLIP)
  dh = jnp.minimum(d[..., 3] / wh, BBOX_XFORM_CLIP)
  pred_ctr_x = dx * widths[..., None] + ctr_x[..., None]
  pred_ctr_y = dy * heights[..., None] + ctr_y[..., None]
  pred_w = jnp.exp(dw) * widths[..., None]
  pred_h = jnp.exp(dh) * heights[..., None]
  boxes = jnp.stack(
      [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
      axis=-1,
  )
  return boxes.reshape(deltas.shape)


def xyxy_to_xywh(boxes):
  """(..., 4) XYXY -> (..., 4) COCO XYWH (x, y, width, height)."""
  return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes):
  """(..., 4) COCO XYWH -> (..., 4) XYXY."""
  return jnp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)
