"""A model's labels and a dataset's categories: display names, and the check that the two agree.

A model's class names are a config field, `model.class_names`: the names of labels 1..K, () when unknown. The
COCO configs set COCO's names; the trainer sets the training set's names before it saves the config with the
checkpoint (`dataset_class_names`), so that evaluation and prediction from a checkpoint name what it was trained on.
`check_dataset_matches_model` stops a run whose dataset has another number of categories than the model has labels.
"""

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
# The name of a label that is no category (a gap in a "coco_ids" label space), as torchvision's weights meta has it.
NO_CATEGORY = "N/A"


def coco_class_names() -> tuple[str, ...]:
  """COCO's 80 names in contiguous label order (label l is the l-th category by increasing id)."""
  return tuple(COCO_CATEGORY_NAMES[i] for i in sorted(COCO_CATEGORY_NAMES))


def coco_id_class_names(num_classes: int = 90) -> tuple[str, ...]:
  """The names of labels 1..num_classes when label == COCO category id: NO_CATEGORY in the gaps (torchvision's
  _COCO_CATEGORIES without its background entry)."""
  return tuple(COCO_CATEGORY_NAMES.get(i, NO_CATEGORY) for i in range(1, int(num_classes) + 1))


def dataset_class_names(category_map, label_space: str, num_classes: int) -> tuple[str, ...]:
  """The names of labels 1..num_classes for a dataset's `records.CategoryMap` in a model's label space.

  "contiguous": the categories by increasing id (the CategoryMap's order); "coco_ids": label == category id, with
  NO_CATEGORY for ids the dataset does not have. Call `check_dataset_matches_model` first: the names assume that the
  dataset fits the model's labels.
  """
  if label_space == "coco_ids":
    by_id = dict(zip(category_map.category_ids, category_map.names))
    return tuple(str(by_id.get(i, NO_CATEGORY)) for i in range(1, int(num_classes) + 1))
  return tuple(str(n) for n in category_map.names)


def check_dataset_matches_model(config, category_map, where: str) -> None:
  """Raise ValueError when the dataset's categories do not fit the model's labels (config.model.num_classes in its
  label_space): a mismatch trains on labels the classifier does not have, which shows up as a non-finite loss.

  where: names the dataset in the message (the annotation file and the config key it came from).
  """
  model = config.model
  num_classes = int(model.num_classes)
  names = ", ".join(_shown(category_map.names))
  if model.label_space == "coco_ids":
    largest = max(category_map.category_ids)
    if largest > num_classes or min(category_map.category_ids) < 1:
      raise ValueError(f"{where}: the dataset's category ids go up to {largest} ({names}), the model's labels are "
                       f"the COCO category ids 1..{num_classes} (model.label_space 'coco_ids', model.num_classes)")
    return
  if category_map.num_classes != num_classes:
    raise ValueError(f"{where}: the dataset has {category_map.num_classes} categories ({names}), the model has "
                     f"{num_classes} (model.num_classes); set --config.model.num_classes={category_map.num_classes}")


def _shown(names, limit: int = 10) -> list[str]:
  names = [str(n) for n in names]
  return names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])


def _config_get(config, *keys):
  """config[k1][k2]... for a ConfigDict or a plain dict; None where a key is missing."""
  for key in keys:
    try:
      config = config[key]
    except (KeyError, TypeError, AttributeError):
      return None
  return config


def class_names_for_config(config) -> list[str] | None:
  """Display names indexed by label (entry 0 "background"), or None when unknown.

  Looked up, in order: `model.class_names` (the names of labels 1..K) when it holds num_classes names; the
  categories of `dataset.val_json` when that file exists and fits the label space (contiguous: as many categories as
  classes; coco_ids: ids up to num_classes).
  """
  num_classes = int(_config_get(config, "model", "num_classes") or 0)
  label_space = _config_get(config, "model", "label_space")
  names = _config_get(config, "model", "class_names")
  if names and len(names) == num_classes:
    return ["background", *(str(n) for n in names)]
  val_json = _config_get(config, "dataset", "val_json")
  if val_json and os.path.isfile(val_json):
    try:
      with open(val_json) as f:
        categories = json.load(f)["categories"]
      by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
      if label_space == "coco_ids":
        if by_id and max(by_id) <= num_classes:
          return ["background", *(by_id.get(i, NO_CATEGORY) for i in range(1, num_classes + 1))]
      elif len(by_id) == num_classes:
        return ["background", *(by_id[i] for i in sorted(by_id))]  # contiguous labels follow increasing id
    except (OSError, ValueError, KeyError, TypeError):
      pass  # an unreadable file only costs the names; evaluation reports it properly
  return None
