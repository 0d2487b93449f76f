"""COCO-format datasets from local files: an annotation JSON read with pycocotools and a folder of images.

`load_coco` turns the JSON into one `ImageRecord` per image, in the library's conventions (records.py): boxes XYXY
float32 in original pixels (COCO's XYWH converted here, at the edge), contiguous labels through the one
`CategoryMap`, masks as compressed RLE dicts whatever the JSON used (polygons, uncompressed or compressed RLE), and
keypoints as (n, K, 3) float32.

What is fixed or dropped, and why:
  * a box that reaches outside its image is clipped to the image (boxes, masks and the image must agree); one that
    overshoots by up to `CLIP_TOLERANCE` px (COCO's own boxes do, by rounding) silently, one farther out counted;
  * an instance whose box has a negative width or height: no box can be made of it (COCO's XYWH never has one
    unless the file is broken), so it is dropped, not flipped;
  * an instance whose box (clipped to the image) is narrower or shorter than `min_box_size`: it gives degenerate
    regression targets and an empty mask crop;
  * a polygon with fewer than 3 points (or an odd number of coordinates): pycocotools cannot rasterize it; the
    instance goes with it when no valid polygon remains, since its mask target would be empty;
  * with `train=True` and `skip_empty`, an image without any usable (non-crowd) instance: it has no foreground to
    learn from. Evaluation (`train=False`) keeps every image, so that COCOeval scores exactly the file's N images;
  * with `train=True` and `min_keypoints_per_image` K > 0, an image whose kept instances have fewer than K visible
    keypoints (visibility > 0) in all: Detectron2's MIN_KEYPOINTS_PER_IMAGE, torchvision's min_keypoints_per_image.
Fixes and drops are counted in `CocoSource.stats` and reported once, in one summary `warnings.warn` (a warning
rather than a log line, so that it reaches a user who has not configured logging, and tests can catch it); the
normal summary (images kept, skipped) goes to `logging` at INFO.

Images are decoded by `images.read_image`, the one decoder of training, evaluation and prediction (see there for
16-bit and other non-8-bit files).

Malformed input fails at load time with an error naming the annotation file and, where it applies, the annotation
id: a wrong category id or keypoint length is a data bug that training must not paper over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import warnings

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_jax.data.images import read_image
from mrcnn_jax.data.records import CategoryMap, ImageRecord

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "annotations", "categories")
# A box may overshoot its image by this much (pixels) before its clipping is reported: COCO's boxes, computed from
# polygons, overshoot by fractions of a pixel.
CLIP_TOLERANCE = 1.0
# `CocoSource.stats` of the fixes and drops that the one summary warning reports, with what each count means.
_FIX_MESSAGES = (
    ("dropped_negative_boxes", "dropped {} instances whose box has a negative width or height"),
    ("dropped_small_boxes", "dropped {} instances with a box side under {min_box_size} px"),
    ("dropped_invalid_polygons", "dropped {} instances without a valid mask"),
    ("removed_polygons", "removed {} invalid polygons (fewer than 3 points)"),
    ("clipped_boxes", "clipped {} boxes reaching more than {tolerance} px outside their image to the image"),
)


@dataclasses.dataclass
class CocoSource:
  """A loaded COCO-format dataset.

  records: one `ImageRecord` per kept image, in the order of the JSON's "images" list; `file_name` is the absolute
    path of the image (image_dir joined with the JSON's file_name).
  category_map: the dataset's category ids <-> contiguous labels 1..K.
  coco: the pycocotools `COCO` object over the whole file (all images, all annotations, nothing dropped), for
    evaluation with COCOeval. Not pickled (None in a copy sent to a loader worker).
  stats: counts: images (in the file), kept (records), skipped_empty, skipped_few_keypoints (training images with
    fewer visible keypoints than asked), instances (kept), crowd (kept crowd instances), dropped_negative_boxes,
    dropped_small_boxes, dropped_invalid_polygons (instances left without a valid mask), removed_polygons
    (individual invalid polygons removed, whether or not their instance survived), clipped_boxes (kept instances
    whose box reached more than CLIP_TOLERANCE px outside the image).
  num_keypoints: K of the records' (n, K, 3) keypoints, or None when the dataset has none.
  """

  records: list[ImageRecord]
  category_map: CategoryMap
  coco: COCO
  stats: dict[str, int]
  annotation_file: str
  image_dir: str
  num_keypoints: int | None = None

  def __getstate__(self):
    # The input pipeline pickles the source into every worker process; the pycocotools index (gigabytes for COCO
    # train) is only for evaluation, so it stays behind.
    state = dict(self.__dict__)
    state["coco"] = None
    return state

  def load_image(self, record: ImageRecord) -> np.ndarray:
    """The record's image as (H, W, 3) uint8 RGB. Raises FileNotFoundError / ValueError naming the file (see
    `read_image`); the training loader skips such images, evaluation lets the error stop the run."""
    return read_image(record.file_name, (record.height, record.width))

  def check_images(self, decode: bool = False) -> None:
    """Fail early, before an evaluation spends its time, if image files are missing (or, with `decode`, unreadable).

    Raises FileNotFoundError listing the missing files (the first 10 and the count), or the first `read_image`
    error when `decode` is set. Existence checks only by default: decoding every image costs as much as a pass of
    the evaluation's input pipeline.
    """
    missing = [r.file_name for r in self.records if not os.path.isfile(r.file_name)]
    if missing:
      shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
      raise FileNotFoundError(
          f"{len(missing)} of {len(self.records)} image files of {self.annotation_file} are missing: {shown}")
    if decode:
      for record in self.records:
        self.load_image(record)


def load_coco(annotation_file, image_dir, *, train: bool, skip_empty: bool = True, min_box_size: float = 1.0,
              num_keypoints: int | None = None, min_keypoints_per_image: int = 0) -> CocoSource:
  """Read a COCO-format annotation file and describe its images as `ImageRecord`s.

  annotation_file: path of the JSON (instances_*.json, person_keypoints_*.json, or the same format).
  image_dir: folder the JSON's "file_name"s are relative to.
  train: training keeps only images with a usable instance (when `skip_empty`) and, with min_keypoints_per_image,
    enough visible keypoints; evaluation keeps every image.
  min_box_size: instances whose clipped box is narrower or shorter than this (pixels) are dropped.
  num_keypoints: K; by default the length of the categories' "keypoints" name lists (None if no category has one).
  min_keypoints_per_image: with `train`, images whose kept instances have fewer visible keypoints (visibility > 0)
    than this, all instances together, are skipped (config model.keypoint_head.min_visible_per_image, when the
    keypoint head is on); 0 keeps them all.
  Returns a `CocoSource`. Records carry masks (compressed RLE) when any annotation has a segmentation, keypoints
  (n, K, 3) float32 when K is known (zeros, i.e. "not labeled", for instances without keypoints).

  Raises FileNotFoundError for a missing annotation file or image folder; ValueError naming the file (and the key or
  the annotation id) for invalid JSON, missing or empty sections, unknown category ids, keypoint arrays of the wrong
  length, malformed boxes or segmentations.
  """
  annotation_file = os.fspath(annotation_file)
  dataset = _read_json(annotation_file)
  _check_dataset(dataset, annotation_file)
  image_dir = os.path.abspath(os.fspath(image_dir))
  if not os.path.exists(image_dir):
    raise FileNotFoundError(f"image directory not found: {image_dir} (images of {annotation_file})")
  if not os.path.isdir(image_dir):
    raise NotADirectoryError(f"image directory is not a directory: {image_dir} (images of {annotation_file})")

  category_map = CategoryMap.from_coco_categories(dataset["categories"])
  num_keypoints = _resolve_num_keypoints(num_keypoints, dataset["categories"], annotation_file)
  # An annotation file whose segmentations are all absent or empty is a boxes-only dataset: no masks, nothing
  # dropped for it. Otherwise every instance must come with a usable mask.
  has_masks = any(a.get("segmentation") for a in dataset["annotations"])

  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
    coco.createIndex()

  stats = new_stats(len(dataset["images"]))
  records = []
  for image in dataset["images"]:
    height, width = int(image["height"]), int(image["width"])
    instances = []
    for ann in coco.imgToAnns.get(image["id"], []):
      where = f"{annotation_file}: annotation id {ann['id']} (image id {image['id']})"
      instance = _parse_annotation(ann, height, width, where, category_map, num_keypoints, has_masks, min_box_size,
                                   stats)
      if instance is not None:
        instances.append(instance)
    record = _make_record(image, image_dir, height, width, instances, has_masks, num_keypoints)
    if train and not keep_for_training(record, stats, skip_empty=skip_empty,
                                       min_keypoints_per_image=min_keypoints_per_image):
      continue
    count_instances(record, stats)
    records.append(record)
  stats["kept"] = len(records)

  log.info("%s: %s", annotation_file, summary(stats, min_keypoints_per_image))
  fixes = fixes_message(stats, min_box_size)
  if fixes:
    warnings.warn(f"{annotation_file}: {fixes}; kept {stats['instances']} instances in {stats['kept']} images",
                  stacklevel=2)
  return CocoSource(records, category_map, coco, stats, annotation_file, image_dir, num_keypoints)


def new_stats(num_images: int) -> dict[str, int]:
  """The zeroed `CocoSource.stats` of a file of `num_images` images (the tfds source keeps the same counts)."""
  return dict(images=int(num_images), kept=0, skipped_empty=0, skipped_few_keypoints=0, instances=0, crowd=0,
              dropped_negative_boxes=0, dropped_small_boxes=0, dropped_invalid_polygons=0, removed_polygons=0,
              clipped_boxes=0)


def keep_for_training(record: ImageRecord, stats: dict, *, skip_empty: bool, min_keypoints_per_image: int) -> bool:
  """Whether a training set keeps `record` (see the module docstring); a skipped one is counted in `stats`
  (skipped_empty or skipped_few_keypoints). Shared with the tfds source, which applies the same rules at read time."""
  if skip_empty and not np.any(~np.asarray(record.is_crowd, bool)):
    stats["skipped_empty"] += 1
    return False
  if min_keypoints_per_image > 0:
    visible = 0 if record.keypoints is None else int((np.asarray(record.keypoints)[..., 2] > 0).sum())
    if visible < min_keypoints_per_image:
      stats["skipped_few_keypoints"] += 1
      return False
  return True


def count_instances(record: ImageRecord, stats: dict) -> None:
  """Adds a kept record's instances (and its crowd ones) to `stats`."""
  stats["instances"] += record.num_instances
  stats["crowd"] += int(np.asarray(record.is_crowd, bool).sum())


def summary(stats: dict, min_keypoints_per_image: int = 0) -> str:
  """The one-line INFO summary of a loaded set's `stats`: images kept and skipped, instances."""
  skipped = f"{stats['skipped_empty']} skipped without usable annotations"
  if min_keypoints_per_image > 0:
    skipped += f", {stats['skipped_few_keypoints']} with fewer than {min_keypoints_per_image} visible keypoints"
  return (f"{stats['kept']} of {stats['images']} images kept ({skipped}), {stats['instances']} instances "
          f"({stats['crowd']} crowd)")


def fixes_message(stats: dict, min_box_size: float) -> str:
  """What was fixed or dropped in the annotations, from `stats` ("" when nothing was): the one warning's text."""
  parts = [text.format(stats[key], min_box_size=min_box_size, tolerance=CLIP_TOLERANCE)
           for key, text in _FIX_MESSAGES if stats.get(key)]
  return "; ".join(parts)


def decode_masks(record: ImageRecord) -> np.ndarray:
  """The record's instance masks as full-image bitmaps: (n, H, W) uint8 in {0, 1}; (0, H, W) when n == 0.

  Full-image bitmaps are for tests and visualization; the training input crops masks to their boxes instead
  (docs/design.md). Raises ValueError when the record has instances but no masks (a boxes-only source).
  """
  n = record.num_instances
  if n == 0:
    return np.zeros((0, record.height, record.width), np.uint8)
  if record.masks is None:
    raise ValueError(f"image id {record.image_id} ({record.file_name}) has {n} instances but no masks")
  masks = mask_utils.decode(list(record.masks))  # (H, W, n), Fortran order
  return np.ascontiguousarray(np.transpose(masks, (2, 0, 1)))


# ---------------------------------------------------------------------------------------------------------------------
# Reading and checking the file.


def _read_json(path: str) -> dict:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"annotation file not found: {path}") from None
  try:
    dataset = json.loads(data)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
    raise ValueError(f"annotation file {path} is not valid JSON (empty, truncated or not JSON): {e}") from None
  if not isinstance(dataset, dict):
    raise ValueError(f"annotation file {path} must hold a JSON object with keys {list(REQUIRED_KEYS)}, "
                     f"got a JSON {type(dataset).__name__}")
  return dataset


def _check_dataset(dataset: dict, path: str) -> None:
  """Structural checks, before pycocotools indexes the file (its errors would be bare KeyErrors)."""
  for key in REQUIRED_KEYS:
    if key not in dataset:
      raise ValueError(f"annotation file {path} has no {key!r} key (a COCO file needs {list(REQUIRED_KEYS)})")
    if not isinstance(dataset[key], list):
      raise ValueError(f"annotation file {path}: {key!r} must be a list, got {type(dataset[key]).__name__}")
  if not dataset["images"]:
    raise ValueError(f"annotation file {path}: 'images' is empty")
  if not dataset["categories"]:
    raise ValueError(f"annotation file {path}: 'categories' is empty")

  image_ids = set()
  for i, image in enumerate(dataset["images"]):
    _check_entry_fields(image, i, "images", "image", ("file_name", "height", "width"), path)
    if not (_is_int(image["height"]) and _is_int(image["width"]) and image["height"] > 0 and image["width"] > 0):
      raise ValueError(f"annotation file {path}: image id {image['id']} has an invalid size "
                       f"height={image['height']!r} width={image['width']!r}")
    if image["id"] in image_ids:
      raise ValueError(f"annotation file {path}: image id {image['id']} appears twice in 'images'")
    image_ids.add(image["id"])

  category_ids = set()
  for i, category in enumerate(dataset["categories"]):
    if not isinstance(category, dict) or not _is_int(category.get("id")):
      raise ValueError(f"annotation file {path}: 'categories' entry {i} has no integer 'id'")
    if category["id"] in category_ids:
      raise ValueError(f"annotation file {path}: category id {category['id']} appears twice in 'categories'")
    category_ids.add(category["id"])

  annotation_ids = set()
  for i, ann in enumerate(dataset["annotations"]):
    _check_entry_fields(ann, i, "annotations", "annotation", ("image_id", "category_id", "bbox"), path)
    if ann["image_id"] not in image_ids:
      raise ValueError(f"annotation file {path}: annotation id {ann['id']} refers to image id {ann['image_id']}, "
                       "which is not in 'images'")
    # pycocotools indexes annotations by id: a duplicate would silently replace the first and skew evaluation.
    if ann["id"] in annotation_ids:
      raise ValueError(f"annotation file {path}: annotation id {ann['id']} appears twice in 'annotations'")
    annotation_ids.add(ann["id"])


def _check_entry_fields(entry, index: int, section: str, kind: str, fields: tuple[str, ...], path: str) -> None:
  """Entry `index` of the file's `section` list must be a dict with an "id" and every one of `fields`; ValueError
  naming the entry (by `kind` and id, once it has one) otherwise."""
  if not isinstance(entry, dict) or "id" not in entry:
    raise ValueError(f"annotation file {path}: {section!r} entry {index} has no 'id'")
  for field in fields:
    if field not in entry:
      raise ValueError(f"annotation file {path}: {kind} id {entry['id']} has no {field!r}")


def _resolve_num_keypoints(num_keypoints, categories, path: str) -> int | None:
  if num_keypoints is not None:
    if not _is_int(num_keypoints) or num_keypoints < 1:
      raise ValueError(f"num_keypoints must be a positive integer or None, got {num_keypoints!r}")
    return int(num_keypoints)
  # The record holds one (n, K, 3) array per image, so all categories with keypoints must agree on K.
  lengths = sorted({len(c["keypoints"]) for c in categories if c.get("keypoints")})
  if len(lengths) > 1:
    raise ValueError(f"annotation file {path}: categories declare different numbers of keypoints {lengths}; "
                     "pass num_keypoints")
  return lengths[0] if lengths else None


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------------
# One annotation -> one instance.


def _parse_annotation(ann, height, width, where, category_map, num_keypoints, has_masks, min_box_size, stats):
  """One annotation dict -> an instance dict (box, label, is_crowd, rle, keypoints, id), or None when dropped.

  Errors (a data bug) are checked before drops, so that a bad annotation is reported even if it would be dropped.
  """
  try:
    label = category_map.to_label(ann["category_id"])
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"{where}: unknown category id {ann['category_id']!r} (the file's categories are "
                     f"{list(category_map.category_ids)})") from None
  keypoints = _parse_keypoints(ann.get("keypoints"), num_keypoints, where)
  box, overshoot = _parse_box(ann["bbox"], height, width, where)

  if box is None:
    stats["dropped_negative_boxes"] += 1
    return None
  if box[2] - box[0] < min_box_size or box[3] - box[1] < min_box_size:
    stats["dropped_small_boxes"] += 1
    return None
  rle = None
  if has_masks:
    rle, removed = _segmentation_to_rle(ann.get("segmentation"), height, width, where)
    stats["removed_polygons"] += removed
    if rle is None:
      stats["dropped_invalid_polygons"] += 1
      return None
  if overshoot > CLIP_TOLERANCE:  # counted for kept instances only: a box clipped to nothing is a small box
    stats["clipped_boxes"] += 1
  return dict(box=box, label=label, is_crowd=bool(ann.get("iscrowd", 0)), rle=rle, keypoints=keypoints, id=ann["id"])


def _parse_box(bbox, height, width, where) -> tuple[np.ndarray | None, float]:
  """COCO XYWH -> ((4,) float32 XYXY clipped to the image, how far (px) it reached outside the image before).

  The box is None when its width or height is negative (dropped by the caller).
  """
  try:
    x, y, w, h = (float(v) for v in bbox)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: bbox must be 4 numbers [x, y, width, height], got {bbox!r}") from None
  if not all(math.isfinite(v) for v in (x, y, w, h)):
    raise ValueError(f"{where}: bbox has non-finite values {bbox!r}")
  if w < 0 or h < 0:
    return None, 0.0
  box = np.array([x, y, x + w, y + h], np.float64)
  limits = np.array([width, height, width, height], np.float64)
  overshoot = float(max(np.max(-box), np.max(box - limits), 0.0))
  box = np.clip(box, 0.0, limits)
  return box.astype(np.float32), overshoot


def _parse_keypoints(keypoints, num_keypoints, where) -> np.ndarray | None:
  """Flat [x1, y1, v1, x2, ...] -> (K, 3) float32, or None when the annotation has none (missing or empty list)."""
  if keypoints is None or (isinstance(keypoints, (list, tuple)) and len(keypoints) == 0):
    return None
  if num_keypoints is None:
    raise ValueError(f"{where}: has keypoints, but no category declares a 'keypoints' list; pass num_keypoints")
  try:
    array = np.asarray(keypoints, np.float32)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: keypoints must be a flat list of numbers") from None
  if array.ndim != 1 or array.size != 3 * num_keypoints:
    raise ValueError(f"{where}: keypoints has {array.size} values, expected 3 * {num_keypoints} = "
                     f"{3 * num_keypoints} (x, y, visibility per keypoint)")
  return array.reshape(num_keypoints, 3)


def _segmentation_to_rle(segmentation, height, width, where) -> tuple[dict | None, int]:
  """Any COCO segmentation -> ({"size": [H, W], "counts": bytes} compressed RLE or None, polygons removed).

  Polygons: a list of [x1, y1, x2, y2, ...] lists; invalid ones (< 3 points, odd length, non-finite) are removed and
  the rest rasterized and merged into one RLE. Uncompressed RLE ({"counts": [ints]}): compressed by pycocotools.
  Compressed RLE ({"counts": str | bytes}): checked and kept. None (no mask) when nothing usable remains.
  """
  if not segmentation:
    return None, 0
  if isinstance(segmentation, list):
    polygons, removed = [], 0
    for polygon in segmentation:
      if not isinstance(polygon, (list, tuple)):
        raise ValueError(f"{where}: polygon segmentation must be a list of [x1, y1, x2, y2, ...] lists, got an "
                         f"element {polygon!r}")
      try:
        coords = [float(v) for v in polygon]
      except (TypeError, ValueError):
        raise ValueError(f"{where}: polygon has non-numeric coordinates") from None
      if len(coords) >= 6 and len(coords) % 2 == 0 and all(math.isfinite(v) for v in coords):
        polygons.append(coords)
      else:
        removed += 1
    if not polygons:
      return None, removed
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return {"size": [height, width], "counts": rle["counts"]}, removed

  if not (isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation):
    raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict with 'size' and 'counts', "
                     f"got {type(segmentation).__name__}")
  size = segmentation["size"]
  if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) for s in size)
          and list(size) == [height, width]):
    raise ValueError(f"{where}: RLE size {size!r} differs from the image's [height, width] [{height}, {width}]")
  counts = segmentation["counts"]
  if isinstance(counts, list):
    # pycocotools' decoder rejects runs past the image but fills short ones with zeros; a sum other than H * W
    # means the RLE was made for another image size.
    if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
      raise ValueError(f"{where}: uncompressed RLE counts must be non-negative integers summing to "
                       f"height * width = {height * width}")
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"]}, 0
  if isinstance(counts, (str, bytes)):
    try:
      counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
      rle = {"size": [height, width], "counts": counts}
      mask_utils.decode(rle)  # validates the string (runs past the image are rejected) before training meets it
    except (UnicodeEncodeError, ValueError):
      raise ValueError(f"{where}: compressed RLE counts are not a valid COCO RLE string") from None
    return rle, 0
  raise ValueError(f"{where}: RLE counts must be a list of integers or a string, got {type(counts).__name__}")


def _make_record(image, image_dir, height, width, instances, has_masks, num_keypoints) -> ImageRecord:
  n = len(instances)
  keypoints = None
  if num_keypoints is not None:
    # Instances without keypoints get visibility 0 everywhere: "not labeled", which the keypoint loss ignores.
    keypoints = np.zeros((n, num_keypoints, 3), np.float32)
    for i, inst in enumerate(instances):
      if inst["keypoints"] is not None:
        keypoints[i] = inst["keypoints"]
  return ImageRecord(
      image_id=image["id"],
      file_name=os.path.join(image_dir, image["file_name"]),
      height=height,
      width=width,
      boxes=np.array([inst["box"] for inst in instances], np.float32).reshape(n, 4),
      classes=np.array([inst["label"] for inst in instances], np.int32).reshape(n),
      is_crowd=np.array([inst["is_crowd"] for inst in instances], bool).reshape(n),
      masks=[inst["rle"] for inst in instances] if has_masks else None,
      keypoints=keypoints,
      annotation_ids=np.array([inst["id"] for inst in instances], np.int64).reshape(n),
  )
