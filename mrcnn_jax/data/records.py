"""The per-image annotation record every data source produces, and the category mapping.

A record is what a source (COCO JSON, the tfds builder, the synthetic shapes set) hands to the transforms: one image's
file and its instances, in the library's conventions (XYXY float32 boxes in original-image pixels, contiguous labels).
Masks stay compressed (COCO RLE) until the transforms crop them to their boxes, so a record is small.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class ImageRecord:
  """One image and its instances.

  image_id: the dataset's image id. file_name: path of the image file (absolute, or relative to the source's image
  directory as the source documents). height, width: the image's size in pixels (from the annotation file).
  boxes: (n, 4) float32 XYXY, original pixels. classes: (n,) int32 contiguous labels 1..K (0 is background, never
  stored). is_crowd: (n,) bool. masks: n COCO RLE dicts ({"size": [h, w], "counts": bytes | str}) or None when the
  source has no masks. keypoints: (n, K_kp, 3) float32 (x, y, visibility in {0, 1, 2}) or None. annotation_ids: (n,)
  int64, the source's annotation ids (for error messages).
  """

  image_id: int
  file_name: str
  height: int
  width: int
  boxes: np.ndarray
  classes: np.ndarray
  is_crowd: np.ndarray
  masks: list | None = None
  keypoints: np.ndarray | None = None
  annotation_ids: np.ndarray | None = None

  @property
  def num_instances(self) -> int:
    return int(self.boxes.shape[0])


@dataclasses.dataclass(frozen=True)
class CategoryMap:
  """COCO category ids (any integers, with gaps) <-> contiguous labels 1..K, in increasing id order.

  The one place the mapping lives: sources build it from the annotation file's categories, the evaluator maps
  predictions back with it.
  """

  category_ids: tuple[int, ...]  # label l (1-based) has category id category_ids[l - 1]
  names: tuple[str, ...]

  @classmethod
  def from_coco_categories(cls, categories: Sequence[dict]) -> "CategoryMap":
    cats = sorted(categories, key=lambda c: c["id"])
    return cls(tuple(int(c["id"]) for c in cats), tuple(str(c.get("name", c["id"])) for c in cats))

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  def to_label(self, category_id: int) -> int:
    try:
      return self._index[int(category_id)]
    except KeyError:
      raise KeyError(f"category id {category_id} is not among the dataset's categories") from None

  def to_category_id(self, label: int) -> int:
    if not 1 <= label <= len(self.category_ids):
      raise ValueError(f"label {label} is outside 1..{len(self.category_ids)}")
    return self.category_ids[label - 1]

  @property
  def label_to_category_id(self) -> tuple[int, ...]:
    """Index = label: entry 0 (background) is 0. The `category_ids` argument of `predictor.to_coco_results`."""
    return (0,) + self.category_ids

  @functools.cached_property
  def _index(self) -> dict[int, int]:
    return {c: i + 1 for i, c in enumerate(self.category_ids)}
