"""The Predictor: RGB images of any size in, detections in original-image pixels out; and COCO result dicts.

Where the work happens:
  host    check the images, resize / normalize / pad each to the config's fixed canvas (`data.transforms`), batch;
  device  one jitted `infer` program on (B, canvas_h, canvas_w, 3) that returns fixed-size detections;
  host    drop invalid slots, map boxes and keypoints back to the original image, paste the 28 x 28 mask
          probabilities into full-image masks (a jitted `ops.masks.paste_masks` on the CPU device).

Boxes are XYXY float32 in absolute pixels, as everywhere in the library; COCO's XYWH appears only in
`to_coco_results`.

Command line (`predict_files`): overlays `<out>/<image stem>.png` and `<out>/predictions.json` for image files,

  python -m mrcnn_jax.predict --config=configs/FILE.py --checkpoint=DIR --images a.jpg b.png ... --out=DIR \\
      [--score_threshold=0.5] [--batch_size=N] [--config.key=value ...]

where DIR is anything `checkpoint.load_inference` reads (converted weights, a training workdir, one of its steps).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import jax
import numpy as np

from mrcnn_jax import atomic
from mrcnn_jax.data import transforms
from mrcnn_jax.ops import masks as mask_ops

# The model's output keys the Predictor reads (DESIGN.md, "Programs": infer).
_REQUIRED_KEYS = ("boxes", "scores", "classes", "valid")

# `paste_masks` jitted with the output size, threshold and mode static: jit's cache then holds one program per
# (number of masks, image size), compiled the first time that shape is seen.
_paste_masks_jit = jax.jit(mask_ops.paste_masks, static_argnums=(2, 3, 4))


def _host_device():
  """The CPU device, where masks are pasted so that the accelerator stays free for the next batch; the default
  device when JAX runs without a CPU backend."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return jax.devices()[0]


class Predictor:
  """Runs a detector on a list of images and returns per-image detections in original-image pixels.

  Usage:
    predictor = Predictor(config, variables, batch_size=2)
    results = predictor([image_a, image_b, image_c])   # (H, W, 3) RGB arrays of any sizes

  Args:
    config: ml_collections ConfigDict with
      `input`: pixel_format, pixel_scale, pixel_mean, pixel_std, resize_mode, min_size_test, max_size_test,
        canvas_hw (see `data.transforms.preprocess`);
      `model`: mask_head.enabled, mask_head.paste_mode ("detectron2" | "torchvision"), mask_head.mask_threshold,
        keypoint_head.enabled, label_space (kept as `self.label_space`: "coco_ids" when the labels are COCO
        category ids, as torchvision's 91-id space; "contiguous" for labels 1..K that map to category ids through
        the dataset, see `to_coco_results(category_ids=...)`).
    variables: the model's variables (a pytree), moved to the default device once here.
    infer_fn: `infer_fn(variables, images, image_info) -> dict`, with images (B, canvas_h, canvas_w, 3) float32
      and image_info (B, 6) float32 (`data.transforms.preprocess`), returning fixed-size arrays:
        boxes (B, D, 4) XYXY in canvas (resized-image) pixels, scores (B, D), classes (B, D) int labels 1..K,
        valid (B, D) bool, masks (B, D, M, M) mask probabilities of the predicted class (when the mask head is
        on), keypoints (B, D, 17, 3) (x, y, score) in canvas pixels (when the keypoint head is on).
      Defaults to `mrcnn_jax.modeling.mask_rcnn.build_infer(config)`. It is jitted once here; the batch and the
      canvas never change shape, so it compiles once.
    batch_size: images per `infer_fn` call; the last batch is padded with blank images whose results are dropped.
  """

  def __init__(self, config, variables, *, infer_fn=None, batch_size: int = 1):
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.config = config
    self.input_cfg = config.input
    self.batch_size = int(batch_size)
    self.canvas_hw = tuple(int(s) for s in config.input.canvas_hw)
    if config.input.resize_mode not in transforms.RESIZE_MODES:
      raise ValueError(f"config.input.resize_mode must be one of {transforms.RESIZE_MODES}, "
                       f"got {config.input.resize_mode!r}")

    model_cfg = config.model
    self.label_space = model_cfg.label_space
    self.mask_on = bool(model_cfg.mask_head.enabled)
    self.keypoint_on = bool(model_cfg.keypoint_head.enabled)
    if self.mask_on:
      self.paste_mode = model_cfg.mask_head.paste_mode
      if self.paste_mode not in mask_ops.PASTE_MODES:
        raise ValueError(f"config.model.mask_head.paste_mode must be one of {mask_ops.PASTE_MODES}, "
                         f"got {self.paste_mode!r}")
      self.mask_threshold = float(model_cfg.mask_head.mask_threshold)

    if infer_fn is None:
      # Imported here so that a Predictor over a custom infer_fn (tests, exported programs) needs no model code.
      from mrcnn_jax.modeling import mask_rcnn  # pylint: disable=import-outside-toplevel
      infer_fn = mask_rcnn.build_infer(config)
    self._infer = jax.jit(infer_fn)
    # Once, rather than letting every jitted call copy host arrays to the device again.
    self.variables = jax.device_put(variables)
    self._paste_device = _host_device() if self.mask_on else None

  def __call__(self, images: Sequence[np.ndarray]) -> list[dict]:
    """Detect objects in each image.

    images: a list of (H, W, 3) RGB arrays, each uint8 in 0..255 or float in [0, 1]; sizes may differ.
    Returns one dict per image, in order, with n = its number of detections:
      boxes (n, 4) float32 XYXY in original-image pixels, clipped to the image;
      scores (n,) float32; labels (n,) int32, in the model's label space (`self.label_space`; `to_coco_results`
        maps them to COCO category ids);
      masks (n, H, W) bool, when the mask head is on;
      keypoints (n, 17, 3) float32 (x, y, score) in original-image pixels, when the keypoint head is on.
    Raises TypeError / ValueError naming the image index for a malformed image, before running anything.
    """
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence):
      raise TypeError("images must be a list of (H, W, 3) arrays (wrap a single image in a list), "
                      f"got {type(images).__name__}")
    checked = [self._check(image, i) for i, image in enumerate(images)]

    results = []
    for start in range(0, len(checked), self.batch_size):
      canvases, infos = zip(*(transforms.preprocess(image, self.input_cfg)
                              for image in checked[start:start + self.batch_size]))
      batch, batch_info = self._pad_batch(canvases, infos)
      out = jax.device_get(self.infer_batch(batch, batch_info))
      for j, info in enumerate(infos):
        results.append(self.postprocess({k: np.asarray(v[j]) for k, v in out.items()}, info))
    return results

  def infer_batch(self, images, image_info) -> dict:
    """Start the jitted `infer_fn` on one prepared batch and return without waiting for it (JAX dispatches
    asynchronously; `jax.device_get` of the result waits), so the caller can prepare or post-process other batches
    meanwhile (`mrcnn_jax.evaluate` does).

    images: (B, canvas_h, canvas_w, 3) float32 and image_info (B, 6) float32 (`data.transforms.preprocess`), numpy
      or jax arrays (e.g. sharded along B over a mesh, with `self.variables` replicated on it).
    Returns the model's arrays that `postprocess` reads (boxes, scores, classes, valid, and masks / keypoints when
    those heads are on), each with leading dimension B, as jax arrays. Raises ValueError when infer_fn returns
    fewer keys.
    """
    out = self._infer(self.variables, images, image_info)
    missing = [k for k in self._expected_keys() if k not in out]
    if missing:
      raise ValueError(f"infer_fn returned no {missing}; it returned {sorted(out)}")
    return {k: out[k] for k in self._expected_keys()}

  def _check(self, image, index: int) -> np.ndarray:
    """Validate image `index` (dtype, shape, values, and that its resized size fits the canvas), so that a bad
    image fails before any batch runs. Returns it as uint8 or float32."""
    name = f"image {index}"
    image = transforms.check_image(image, name=name)
    cfg = self.input_cfg
    try:
      resized = transforms.output_size(*image.shape[:2], cfg.min_size_test, cfg.max_size_test, cfg.resize_mode)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from e
    if resized[0] > self.canvas_hw[0] or resized[1] > self.canvas_hw[1]:
      raise ValueError(f"{name}: image of size {image.shape[0]}x{image.shape[1]} resizes to "
                       f"{resized[0]}x{resized[1]}, which does not fit the canvas "
                       f"{self.canvas_hw[0]}x{self.canvas_hw[1]}")
    return image

  def _expected_keys(self) -> tuple[str, ...]:
    keys = _REQUIRED_KEYS
    if self.mask_on:
      keys += ("masks",)
    if self.keypoint_on:
      keys += ("keypoints",)
    return keys

  def _pad_batch(self, canvases, infos):
    """Stack a (possibly short) batch and pad it to batch_size.

    Returns images (batch_size, canvas_h, canvas_w, 3) float32 and image_info (batch_size, 6) float32. Padding
    images are zeros described as a full-canvas image at scale 1, so the model sees a well-formed (blank) image
    rather than one of size 0 (divisions by the valid size stay finite).
    """
    pad = self.batch_size - len(canvases)
    images = np.stack(canvases)
    info = np.stack(infos)
    if pad:
      canvas_h, canvas_w = self.canvas_hw
      blank_info = np.array([canvas_h, canvas_w, 1.0, 1.0, canvas_h, canvas_w], np.float32)
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
      info = np.concatenate([info, np.tile(blank_info, (pad, 1))])
    return images, info

  def postprocess(self, out: dict, info: np.ndarray) -> dict:
    """One image's fixed-size detections (canvas pixels) -> its valid detections in original pixels.

    out: one image's slice of `infer_batch`'s arrays, as numpy: boxes (D, 4), scores (D,), classes (D,),
      valid (D,), masks (D, M, M) and keypoints (D, 17, 3) when those heads are on. info: its image_info row (6,).
    Returns the per-image dict of `__call__`.
    """
    valid_h, valid_w = int(info[transforms.INFO_VALID_H]), int(info[transforms.INFO_VALID_W])
    orig_h, orig_w = int(info[transforms.INFO_ORIG_H]), int(info[transforms.INFO_ORIG_W])
    # original / resized per axis, in float32, as torchvision's `resize_boxes` computes it; Detectron2's
    # `detector_postprocess` multiplies by the same ratio (divided in float64 there, equal up to rounding).
    ratio_h = np.float32(orig_h) / np.float32(valid_h)
    ratio_w = np.float32(orig_w) / np.float32(valid_w)

    index = np.flatnonzero(np.asarray(out["valid"], bool))
    boxes = np.asarray(out["boxes"], np.float32)[index] * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
    boxes = np.clip(boxes, 0.0, np.array([orig_w, orig_h, orig_w, orig_h], np.float32)).astype(np.float32)
    # Detectron2's `detector_postprocess` drops boxes left empty by the clip; torchvision already removed boxes
    # under 0.01 px before NMS, so for its weights this drops nothing.
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    index, boxes = index[nonempty], boxes[nonempty]

    result = {
        "boxes": boxes,
        "scores": np.asarray(out["scores"], np.float32)[index],
        "labels": np.asarray(out["classes"]).astype(np.int32)[index],
    }
    if self.mask_on:
      result["masks"] = self._paste(np.asarray(out["masks"], np.float32)[index], boxes, (orig_h, orig_w))
    if self.keypoint_on:
      keypoints = np.array(out["keypoints"], np.float32)[index]
      keypoints[..., 0] *= ratio_w
      keypoints[..., 1] *= ratio_h
      result["keypoints"] = keypoints
    return result

  def _paste(self, masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """masks (n, M, M) probabilities, boxes (n, 4) in original pixels -> (n, H, W) bool.

    The count is padded to a power of two (zero masks on zero boxes, which paste nothing) so that images with
    different numbers of detections share a handful of compiled programs per image size.
    """
    n = masks.shape[0]
    if n == 0:
      return np.zeros((0,) + image_hw, bool)
    padded = 1 << (n - 1).bit_length()
    masks = np.concatenate([masks, np.zeros((padded - n,) + masks.shape[1:], np.float32)])
    boxes = np.concatenate([boxes, np.zeros((padded - n, 4), np.float32)])
    masks, boxes = jax.device_put((masks, boxes), self._paste_device)
    pasted = _paste_masks_jit(masks, boxes, image_hw, self.mask_threshold, self.paste_mode)
    return np.asarray(pasted)[:n]


def to_coco_results(predictions: Sequence[dict], image_ids: Sequence, *, category_ids=None,
                    keypoint_offset: float = 0.5) -> list[dict]:
  """Predictor outputs -> COCO result dicts, ready for `json.dump` and `COCO.loadRes`.

  Args:
    predictions: per image, a dict as `Predictor.__call__` returns it: boxes (n, 4) XYXY, scores (n,),
      labels (n,), and optionally masks (n, H, W) bool and keypoints (n, 17, 3) (x, y, score).
    image_ids: the COCO image id of each prediction, same length.
    category_ids: `category_ids[label]` is the COCO category id of a label (e.g. a list with index 0 for the
      background); None when the labels already are category ids.
    keypoint_offset: subtracted from keypoint x and y. COCO keypoint annotations are integer pixel indices;
      Detectron2 adds 0.5 to them when loading (so that a pixel's centre sits at +0.5, like box coordinates) and
      subtracts it again when writing results (`instances_to_coco_json`). The default 0.5 follows Detectron2 and
      a data pipeline that shifts like it; use 0.0 for torchvision weights, whose training data and COCO results
      use the annotation coordinates as they are.

  Returns a list with one dict per detection: image_id, category_id (int), bbox [x, y, width, height] (floats),
  score (float); segmentation (RLE with `counts` as str) when masks are present; keypoints [x1, y1, s1, x2, ...]
  when keypoints are present, the third value the keypoint score as Detectron2 writes it (COCOeval ignores the
  third value of detections).
  """
  # pycocotools is only needed here; the Predictor works without it.
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel

  if len(predictions) != len(image_ids):
    raise ValueError(f"got {len(predictions)} predictions and {len(image_ids)} image ids")
  results = []
  for pred, image_id in zip(predictions, image_ids):
    if isinstance(image_id, np.generic):
      image_id = image_id.item()
    boxes = np.asarray(pred["boxes"], np.float32).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    scores = np.asarray(pred["scores"], np.float32).tolist()
    labels = [int(label) for label in np.asarray(pred["labels"]).reshape(-1)]
    if category_ids is None:
      categories = labels
    else:
      categories = []
      for label in labels:
        try:
          if label < 0:
            raise IndexError(label)
          categories.append(int(category_ids[label]))
        except (IndexError, KeyError) as e:
          raise ValueError(f"label {label} of image {image_id} has no entry in category_ids") from e

    rles = None
    if "masks" in pred and len(labels):
      masks = np.asarray(pred["masks"])
      # pycocotools reads (H, W, n) uint8 in column-major order.
      rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
      for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    keypoints = None
    if "keypoints" in pred:
      keypoints = np.array(pred["keypoints"], np.float32).reshape(len(labels), -1, 3)
      keypoints[..., :2] -= np.float32(keypoint_offset)

    for k in range(len(labels)):
      result = {"image_id": image_id, "category_id": categories[k], "bbox": xywh[k], "score": scores[k]}
      if rles is not None:
        result["segmentation"] = rles[k]
      if keypoints is not None:
        result["keypoints"] = keypoints[k].reshape(-1).tolist()
      results.append(result)
  return results


# --------------------------------------------------------------------------------------------------------------------
# Class names, and the command line:
#   python -m mrcnn_jax.predict --config=configs/FILE.py --checkpoint=DIR --images a.jpg b.png --out=DIR
# --------------------------------------------------------------------------------------------------------------------

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


def _check_image_files(paths: Sequence[str], input_cfg) -> list[tuple[int, int]]:
  """Decode every image once, so that a missing, corrupt or oversized file fails naming it before any model code
  runs; returns their (height, width)."""
  from mrcnn_jax.data import coco  # pylint: disable=import-outside-toplevel

  canvas_hw = tuple(int(s) for s in input_cfg.canvas_hw)
  sizes = []
  for path in paths:
    height, width = coco.read_image(path).shape[:2]
    resized = transforms.output_size(height, width, input_cfg.min_size_test, input_cfg.max_size_test,
                                     input_cfg.resize_mode)
    if resized[0] > canvas_hw[0] or resized[1] > canvas_hw[1]:
      raise ValueError(f"image file {path}: {height}x{width} resizes to {resized[0]}x{resized[1]}, which does not "
                       f"fit the canvas {canvas_hw[0]}x{canvas_hw[1]}")
    sizes.append((height, width))
  return sizes


def _instances_json(result: dict, names) -> list[dict]:
  """One image's detections as JSON: label, name, score, box (XYXY, original pixels), segmentation (COCO RLE with
  `counts` as str), keypoints ([[x, y, score], ...]), the last two when the model has those heads."""
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import visualize  # pylint: disable=import-outside-toplevel

  rles = None
  if "masks" in result and len(result["scores"]):
    rles = mask_util.encode(np.asfortranarray(np.asarray(result["masks"]).transpose(1, 2, 0).astype(np.uint8)))
  instances = []
  for k in range(len(result["scores"])):
    label = int(result["labels"][k])
    instance = {"label": label, "name": visualize.class_name(label, names), "score": float(result["scores"][k]),
                "box": [float(v) for v in result["boxes"][k]]}
    if rles is not None:
      instance["segmentation"] = {"size": [int(s) for s in rles[k]["size"]],
                                  "counts": rles[k]["counts"].decode("ascii")}
    if "keypoints" in result:
      instance["keypoints"] = np.asarray(result["keypoints"][k], np.float32).tolist()
    instances.append(instance)
  return instances


def _keep_scores(result: dict, threshold: float) -> dict:
  keep = np.asarray(result["scores"]) >= threshold
  return {k: np.asarray(v)[keep] for k, v in result.items()}


def predict_files(config, variables, image_paths: Sequence[str], out_dir, *, score_threshold: float = 0.5,
                  batch_size: int = 1, class_names=None) -> pathlib.Path:
  """Run the model on image files; write `<out_dir>/<stem>.png` overlays and `<out_dir>/predictions.json`.

  Args:
    config: the ml_collections config (`input`, `model`; `dataset` for class names).
    variables: the model's variables, or a function returning them, called once the images are checked (so that a
      bad file fails before a large checkpoint loads).
    image_paths: image files (any format PIL reads); their stems must differ, since they name the overlays.
    out_dir: created if missing; existing files of the same names are replaced (each atomically).
    score_threshold: detections scoring below it are neither drawn nor written.
    batch_size: images per model call.
    class_names: names indexed by label; None looks them up from the config (`class_names_for_config`).

  predictions.json: {"score_threshold", "label_space", "class_names", "images": {<path as given>: {"height",
  "width", "overlay", "instances": [{"label", "name", "score", "box" [x1, y1, x2, y2] in original pixels,
  "segmentation" (COCO RLE), "keypoints" [[x, y, score] * 17]}, ...]}}}.

  Every image is decoded and checked before the model is built, so a bad file fails naming it before any batch
  runs; then it is decoded again when its batch runs (no image list is held in memory). Returns the JSON path.
  """
  from mrcnn_jax import visualize  # pylint: disable=import-outside-toplevel
  from mrcnn_jax.data import coco  # pylint: disable=import-outside-toplevel

  image_paths = [os.fspath(p) for p in image_paths]
  if not image_paths:
    raise ValueError("no images given")
  stems = {}
  for path in image_paths:
    stem = pathlib.Path(path).stem
    if stem in stems:
      raise ValueError(f"image files {stems[stem]} and {path} would both write the overlay {stem}.png")
    stems[stem] = path
  sizes = _check_image_files(image_paths, config.input)
  names = class_names_for_config(config) if class_names is None else list(class_names)

  predictor = Predictor(config, variables() if callable(variables) else variables, batch_size=batch_size)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails on its inputs leaves nothing behind
  images_json = {}
  for start in range(0, len(image_paths), predictor.batch_size):
    paths = image_paths[start:start + predictor.batch_size]
    images = [coco.read_image(p) for p in paths]
    for path, image, result, (height, width) in zip(paths, images, predictor(images), sizes[start:]):
      result = _keep_scores(result, score_threshold)
      overlay = f"{pathlib.Path(path).stem}.png"
      drawn = visualize.draw_instances(image, result["boxes"], result["labels"], result["scores"],
                                       masks=result.get("masks"), keypoints=result.get("keypoints"),
                                       class_names=names)
      visualize.save_image(out_dir / overlay, drawn)
      images_json[path] = {"height": height, "width": width, "overlay": overlay,
                           "instances": _instances_json(result, names)}
  json_path = out_dir / "predictions.json"
  atomic.write_json(json_path, {
      "score_threshold": float(score_threshold), "label_space": str(config.model.label_space),
      "class_names": names, "images": images_json})
  return json_path


def _define_flags():
  """Flags exist only when this module runs as a program, so importing it (as the library does) defines none."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "Config file: configs/FILE.py[:arg].", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Checkpoint directory with the model's variables.")
  flags.DEFINE_multi_string("images", None, "Image files; several after one --images, or --images repeated.")
  flags.DEFINE_string("out", None, "Output directory: <stem>.png overlays and predictions.json.")
  flags.DEFINE_float("score_threshold", 0.5, "Detections below this score are neither drawn nor written.")
  flags.DEFINE_integer("batch_size", 1, "Images per model call.")
  flags.mark_flags_as_required(["config", "checkpoint", "images", "out"])


def main(argv):
  from absl import app, flags, logging  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import checkpoint  # pylint: disable=import-outside-toplevel

  f = flags.FLAGS
  # `--images a.jpg b.png` leaves b.png (and the rest) as positional arguments: they are images too.
  image_paths = list(f.images) + list(argv[1:])
  stray = [a for a in argv[1:] if a.startswith("-")]
  if stray:
    raise app.UsageError(f"unexpected arguments: {stray}")
  config = f.config

  def load_variables():
    variables, saved_config = checkpoint.load_inference(f.checkpoint)
    saved_model = (saved_config or {}).get("model") or {}
    given_model = json.loads(config.model.to_json_best_effort())
    differ = sorted(k for k in set(saved_model) | set(given_model) if saved_model.get(k) != given_model.get(k))
    if saved_model and differ:
      logging.warning("config.model differs from the config saved with the checkpoint in: %s", ", ".join(differ))
    return variables

  path = predict_files(config, load_variables, image_paths, f.out, score_threshold=f.score_threshold,
                       batch_size=f.batch_size)
  logging.info("wrote %d overlays and %s", len(image_paths), path)


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=import-outside-toplevel

  _define_flags()
  _app.run(main)
