"""Display names of a model's labels: COCO's category names, and the names a config's dataset gives."""

from __future__ import annotations

import json
import os

# COCO 2017's 80 category names by category id (1..90 with gaps), as in its annotation files.
COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork",
    49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli",
    57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant",
    65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard",
    77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def _config_get(config, *keys):
  """config[k1][k2]... for a ConfigDict or a plain dict; None where a key is missing."""
  for key in keys:
    try:
      config = config[key]
    except (KeyError, TypeError, AttributeError):
      return None
  return config


def class_names_for_config(config) -> list[str | None] | None:
  """Display names indexed by label (entry 0 "background"; None for unused labels), or None when unknown.

  Looked up, in order: the categories of `dataset.val_json` when that file exists (any COCO-format dataset);
  COCO's names for a COCO dataset (`dataset.name` containing "coco") or for the "coco_ids" label space, where
  label == category id; the synthetic set's `data.shapes.CLASSES` for `dataset.name` "shapes".
  """
  num_classes = int(_config_get(config, "model", "num_classes") or 0)
  label_space = _config_get(config, "model", "label_space")
  dataset = str(_config_get(config, "dataset", "name") or "").lower()
  val_json = _config_get(config, "dataset", "val_json")
  if label_space != "coco_ids" and val_json and os.path.isfile(val_json):
    try:
      with open(val_json) as f:
        categories = json.load(f)["categories"]
      # Contiguous labels follow increasing category id (`data.records.CategoryMap`).
      names = [str(c.get("name", c["id"])) for c in sorted(categories, key=lambda c: c["id"])]
      if len(names) == num_classes:
        return ["background", *names]
    except (OSError, ValueError, KeyError, TypeError):
      pass  # an unreadable file only costs the names; evaluation reports it properly
  if label_space == "coco_ids":
    return ["background"] + [COCO_CATEGORY_NAMES.get(i) for i in range(1, num_classes + 1)]
  if "coco" in dataset:
    coco_names = [COCO_CATEGORY_NAMES[i] for i in sorted(COCO_CATEGORY_NAMES)]
    # 80 classes: all of COCO; 1 class: the person keypoint set, whose only category is person (id 1).
    if num_classes in (len(coco_names), 1):
      return ["background", *coco_names[:num_classes]]
  if dataset == "shapes":
    from mrcnn_jax.data import shapes  # pylint: disable=import-outside-toplevel

    if num_classes == len(shapes.CLASSES):
      return ["background", *shapes.CLASSES]
  return None
