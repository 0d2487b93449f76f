"""One example: a record and its image -> the fixed-shape numpy arrays the model takes, for training or evaluation.

  record + image --train_example (random short side, random flip)--> transform_train_example --> training example
  record + image --eval_example--> evaluation input (`transforms.preprocess`)

The transform resizes and normalizes the image as the config's resize_mode says (`data.transforms`), pads it to its
canvas, and maps the ground truth along: boxes scaled (and flipped), masks cropped to their boxes at the original
resolution, keypoints moved by the model's coordinate offset (`keypoint_coordinate_offset`), scaled, flipped with the
flip map, unlabeled outside the image. Batching, shuffling and the devices are `data.pipeline`'s.

Training examples (`train_example`), all numpy, G = input_cfg.max_instances, M = input_cfg.gt_mask_size, K keypoints:
  image (Hc, Wc, 3) float32       the normalized resized (and maybe flipped) image at the top left of its canvas,
                                  zeros elsewhere
  image_info (6,) float32         [valid_h, valid_w, scale_h, scale_w, orig_h, orig_w], as `transforms.preprocess`
  gt_boxes (G, 4) float32         XYXY in resized-image pixels; zeros in unused slots
  gt_classes (G,) int32           contiguous labels 1..num_classes; 0 in unused slots
  gt_valid (G,) bool              which slots hold an instance
  gt_is_crowd (G,) bool           crowd instances (kept for matching to ignore, never as targets)
  gt_masks (G, M, M) uint8        each instance's mask cropped to its own box, 0..255 coverage (docs/design.md)
  gt_keypoints (G, K, 3) float32  (x, y, visibility) in resized-image pixels, the annotation's x and y plus the
                                  keypoint offset before resizing; x = y = 0 where visibility is 0
  image_id () int64, num_dropped () int32 (instances beyond G left out)
and the training loader adds num_skipped () int32 (unreadable images replaced to make this example). Batches stack
these along a new leading axis B.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from mrcnn_jax.data import transforms
from mrcnn_jax.data.records import ImageRecord
from mrcnn_jax.ops.masks import crop_masks_to_boxes

# Keypoints per instance when the config does not say (COCO person keypoints).
DEFAULT_NUM_KEYPOINTS = 17

# Full-image masks decoded at once while cropping; bounds the host memory of an image with many instances to
# this many H x W bitmaps.
_MASK_DECODE_CHUNK = 16


def num_keypoints(input_cfg) -> int:
  return int(getattr(input_cfg, "num_keypoints", None) or DEFAULT_NUM_KEYPOINTS)


def _keypoint_flip_permutation(flip_map: Sequence[Sequence[int]], num_keypoints: int) -> np.ndarray:
  """(K,) int64: after a horizontal flip, keypoint j is the flipped keypoint perm[j] (left and right swap)."""
  perm = np.arange(num_keypoints)
  for a, b in flip_map or ():
    if not (0 <= a < num_keypoints and 0 <= b < num_keypoints):
      raise ValueError(f"keypoint_flip_map pair ({a}, {b}) is outside 0..{num_keypoints - 1}")
    perm[a], perm[b] = b, a
  return perm


def select_instances(boxes: np.ndarray, is_crowd: np.ndarray, max_instances: int) -> np.ndarray:
  """Indices of the instances that fit the G ground-truth slots.

  boxes: (n, 4) float XYXY; is_crowd: (n,) bool; max_instances: G.
  Returns (min(n, G),) int64 indices in increasing (annotation) order: all instances when n <= G, else the G largest
  by box area, non-crowd instances first (crowd boxes only fill slots that are left, since they serve only to be
  ignored in matching).
  """
  n = boxes.shape[0]
  if n <= max_instances:
    return np.arange(n)
  area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
  # lexsort: last key is primary. Crowd after non-crowd, then larger area first; stable for ties.
  order = np.lexsort((-area, is_crowd.astype(bool)))
  return np.sort(order[:max_instances])


def _crop_masks(record: ImageRecord, keep: np.ndarray, size: int) -> np.ndarray:
  """(len(keep), M, M) uint8 crops of the kept instances' masks inside their boxes, in original-image pixels.

  Decodes the RLEs a chunk at a time so that no more than `_MASK_DECODE_CHUNK` full-image bitmaps exist at once;
  only the crops leave this function.
  """
  crops = np.zeros((len(keep), size, size), np.uint8)
  if record.masks is None or len(keep) == 0:
    return crops  # a boxes-only dataset: the mask head must be off
  for start in range(0, len(keep), _MASK_DECODE_CHUNK):
    idx = keep[start : start + _MASK_DECODE_CHUNK]
    bitmaps = mask_utils.decode([record.masks[i] for i in idx])  # (H, W, k) uint8, Fortran order
    if bitmaps.shape[:2] != (record.height, record.width):
      ids = record.annotation_ids[idx].tolist() if record.annotation_ids is not None else idx.tolist()
      raise ValueError(f"image {record.file_name} (id {record.image_id}): masks of annotations {ids} have size "
                       f"{bitmaps.shape[:2]}, the image {record.height}x{record.width}")
    crops[start : start + len(idx)] = crop_masks_to_boxes(np.transpose(bitmaps, (2, 0, 1)), record.boxes[idx], size)
  return crops


def check_train_image(record: ImageRecord, image) -> np.ndarray:
  """Validated (H, W, 3) image; ValueError naming the file when its size is not the one the annotations use."""
  image = transforms.check_image(image, name=f"image {record.file_name}")
  if image.shape[:2] != (record.height, record.width):
    raise ValueError(f"image {record.file_name} is {image.shape[0]}x{image.shape[1]} (HxW), but its annotations "
                     f"are for {record.height}x{record.width}")
  return image


def transform_train_example(record: ImageRecord, image, input_cfg, *, short_side: int, flip: bool,
                            canvas_hw: Sequence[int] | None = None, keypoint_offset: float = 0.0) -> dict:
  """`train_example` with its two random choices given: the target short side and whether to flip.

  Resizes (shortest edge `short_side`, longest at most input_cfg.max_size_train, sizes by `transforms.output_size`
  in the config's resize_mode), normalizes in the order of `transforms.preprocess` for that mode, flips
  horizontally if `flip`, pads to canvas_hw (default: the image's `transforms.train_canvas`); maps the ground
  truth along. Returns the example dict of the module docstring (without num_skipped).

  Masks are cropped at the original resolution, inside each instance's original box: resizing is a per-axis scale,
  so that region is the one inside the resized box, and cropping before resizing spares a second resampling of a
  binary mask and the resize of full-image bitmaps. A flip of the image flips each crop left to right (RoIAlign's
  sampling is symmetric about the box centre).

  keypoint_offset: added to the x and y of the labeled keypoints, in original pixels, before anything else
  (`keypoint_coordinate_offset`: 0.5 for Detectron2's convention, 0 for torchvision's, the annotations as they are).
  """
  image = check_train_image(record, image)
  height, width = image.shape[:2]
  new_h, new_w = transforms.output_size(height, width, int(short_side), input_cfg.max_size_train,
                                        input_cfg.resize_mode)
  resized = transforms.resize_and_normalize(image, (new_h, new_w), input_cfg)
  if flip:
    resized = resized[:, ::-1]
  if canvas_hw is None:
    canvas_hw = transforms.train_canvas(height, width, input_cfg)
  canvas = transforms.pad_to_canvas(resized, canvas_hw)
  scale_hw = (new_h / height, new_w / width)

  num_slots = int(input_cfg.max_instances)
  boxes = np.asarray(record.boxes, np.float32).reshape(-1, 4)
  is_crowd = np.asarray(record.is_crowd, bool).reshape(-1)
  keep = select_instances(boxes, is_crowd, num_slots)
  crops = _crop_masks(record, keep, int(input_cfg.gt_mask_size))
  keypoints = _transform_keypoints(record, keep, input_cfg, keypoint_offset, scale_hw, (new_h, new_w), flip)
  return {
      "image": canvas,
      "image_info": np.array([new_h, new_w, *scale_hw, height, width], np.float32),
      "gt_boxes": _in_slots(_transform_boxes(boxes[keep], scale_hw, new_w, flip), num_slots, np.float32),
      "gt_classes": _in_slots(np.asarray(record.classes).reshape(-1)[keep], num_slots, np.int32),
      "gt_valid": np.arange(num_slots) < len(keep),
      "gt_is_crowd": _in_slots(is_crowd[keep], num_slots, bool),
      "gt_masks": _in_slots(crops[:, :, ::-1] if flip else crops, num_slots, np.uint8),
      "gt_keypoints": _in_slots(keypoints, num_slots, np.float32),
      "image_id": np.asarray(record.image_id, np.int64),
      "num_dropped": np.asarray(record.num_instances - len(keep), np.int32),
  }


def _transform_boxes(boxes: np.ndarray, scale_hw: tuple[float, float], resized_w: int, flip: bool) -> np.ndarray:
  """(k, 4) XYXY boxes in original pixels -> (k, 4) float64 in resized pixels, mirrored about the resized image's
  vertical axis when `flip`."""
  scale_h, scale_w = scale_hw
  out = boxes.astype(np.float64) * np.array([scale_w, scale_h, scale_w, scale_h])
  if flip:
    out = np.stack([resized_w - out[:, 2], out[:, 1], resized_w - out[:, 0], out[:, 3]], axis=1)
  return out


def _transform_keypoints(record: ImageRecord, keep: np.ndarray, input_cfg, offset: float,
                         scale_hw: tuple[float, float], resized_hw: tuple[int, int], flip: bool) -> np.ndarray:
  """(len(keep), K, 3) float64 keypoints of the kept instances: (x, y) + offset in resized pixels, flipped with the
  config's keypoint_flip_map when `flip`; visibility 0 outside the resized image; unlabeled ones at (0, 0, 0). Zeros
  when the record has no keypoints. Raises ValueError naming the image when its keypoints are not (n, K, 3)."""
  num_kp = num_keypoints(input_cfg)
  if record.keypoints is None or not len(keep):
    return np.zeros((len(keep), num_kp, 3))
  kp = np.asarray(record.keypoints, np.float64)
  if kp.ndim != 3 or kp.shape[1:] != (num_kp, 3):
    raise ValueError(f"image {record.file_name} (id {record.image_id}): keypoints have shape {kp.shape}, "
                     f"expected (n, {num_kp}, 3) (input_cfg.num_keypoints)")
  (scale_h, scale_w), (new_h, new_w) = scale_hw, resized_hw
  kp = kp[keep].copy()
  # The annotations' pixel indices in the model's coordinates (Detectron2's load_coco_json adds 0.5), as loaded.
  kp[kp[..., 2] > 0, :2] += offset
  kp[..., 0] *= scale_w
  kp[..., 1] *= scale_h
  # Detectron2's `transform_keypoint_annotations`: a keypoint outside the image is unlabeled.
  inside = (kp[..., 0] >= 0) & (kp[..., 0] <= new_w) & (kp[..., 1] >= 0) & (kp[..., 1] <= new_h)
  kp[..., 2] = np.where(inside, kp[..., 2], 0)
  if flip:
    kp[..., 0] = new_w - kp[..., 0]
    kp = kp[:, _keypoint_flip_permutation(input_cfg.keypoint_flip_map, num_kp)]
  kp[kp[..., 2] == 0] = 0  # COCO convention: unlabeled keypoints sit at (0, 0)
  return kp


def _in_slots(values: np.ndarray, num_slots: int, dtype) -> np.ndarray:
  """(k, ...) values -> (num_slots, ...) of `dtype`: the values in the first k slots, zeros in the others."""
  values = np.asarray(values)
  out = np.zeros((num_slots,) + values.shape[1:], dtype)
  out[:len(values)] = values
  return out


def train_example(record: ImageRecord, image, input_cfg, rng: np.random.Generator,
                  canvas_hw: Sequence[int] | None = None, *, keypoint_offset: float = 0.0) -> dict:
  """One training example: random short side and horizontal flip, then `transform_train_example`.

  record: the image's annotations (original pixels). image: (H, W, 3) uint8 RGB (or float in [0, 1]) of size
    (record.height, record.width); another size raises ValueError naming the file.
  input_cfg: config.input (resize_mode, min_size_train, max_size_train, canvases, max_instances, gt_mask_size,
    keypoint_flip_map, pixel_format/scale/mean/std; optional num_keypoints, default 17).
  canvas_hw: the canvas to pad to; default the image's `transforms.train_canvas`.
  keypoint_offset: added to the labeled keypoints' x and y (`keypoint_coordinate_offset` of the config).
  rng: draws, in this order, the short side (uniformly from min_size_train, Detectron2's "choice" style) and the
    flip (probability 0.5).
  Returns the example dict of the module docstring; the instances beyond G (the smallest, crowd ones first, see
  `select_instances`) are left out and counted in num_dropped.
  """
  sizes = np.atleast_1d(np.asarray(input_cfg.min_size_train, np.int64))
  short_side = int(sizes[rng.integers(len(sizes))])
  flip = bool(rng.random() < 0.5)
  return transform_train_example(record, image, input_cfg, short_side=short_side, flip=flip, canvas_hw=canvas_hw,
                                 keypoint_offset=keypoint_offset)


def keypoint_coordinate_offset(config) -> float:
  """The keypoint coordinate convention of `config`'s model (model.keypoint_head.coordinate_offset, see the base
  config): what training adds to the annotated keypoints, and evaluation subtracts from the predicted ones.

  A config saved before the field existed gets what evaluation used then: 0.5 for input.resize_mode "detectron2",
  else 0, so that its checkpoints still evaluate as they did.
  """
  offset = config.model.keypoint_head.get("coordinate_offset")
  if offset is None:
    return 0.5 if config.input.resize_mode == "detectron2" else 0.0
  return float(offset)


def eval_example(record: ImageRecord, image, input_cfg, canvas_hw: Sequence[int] | None = None) -> dict:
  """One evaluation input: `transforms.preprocess` (min_size_test / max_size_test) and the image id.

  canvas_hw: the canvas to pad to; default the image's `transforms.eval_canvas`.
  Returns {"image": (Hc, Wc, 3) float32, "image_info": (6,) float32, "image_id": () int64}.
  """
  canvas, info = transforms.preprocess(image, input_cfg, canvas_hw)
  return {"image": canvas, "image_info": info, "image_id": np.asarray(record.image_id, np.int64)}
