"""The Predictor: RGB images of any size in, detections in original-image pixels out; and COCO result dicts.

Where the work happens:
  host    check the images, resize / normalize / pad each to the smallest of the config's canvases that holds it
          (`data.transforms`), batch the images of each canvas;
  device  one jitted `infer` program per canvas on (B, canvas_h, canvas_w, 3), compiled the first time that canvas
          is used, that returns fixed-size detections;
  host    drop invalid slots, map boxes and keypoints back to the original image, paste the 28 x 28 mask
          probabilities into full-image masks (a jitted `ops.masks.paste_masks` on the CPU device).

Boxes are XYXY float32 in absolute pixels, as everywhere in the library; COCO's XYWH appears only in
`to_coco_results`. The command line over image files is `mrcnn_jax.predict`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from mrcnn_jax.cpu import compiler as cpu_compiler
from mrcnn_jax.data import transforms
from mrcnn_jax.ops import masks as mask_ops

# The model's output keys the Predictor reads (docs/design.md, "Two programs, static shapes": infer).
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
        canvases (see `data.transforms.preprocess`);
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
      Defaults to `mrcnn_jax.modeling.mask_rcnn.build_infer(config)`. It is jitted once here, as the top-level
      program `self.program`, with `cpu.compiler.inference_options()` (so it must not be a jitted function with
      compiler options of its own), and compiles once per canvas (the batch size never changes).
    batch_size: images per `infer_fn` call; images are batched with others of the same canvas, and each canvas's
      last batch is padded with blank images whose results are dropped.
  """

  def __init__(self, config, variables, *, infer_fn=None, batch_size: int = 1):
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.config = config
    self.input_cfg = config.input
    self.batch_size = int(batch_size)
    self.canvases = transforms.canvases(config.input)
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
    # `program`: infer_fn jitted as the top-level program, with the CPU's compiler options (`cpu.compiler`); every
    # output of infer_fn, for callers that want more than `infer_batch` keeps (e.g. the proposals).
    self.program = jax.jit(infer_fn, compiler_options=cpu_compiler.inference_options())
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
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (image, canvas_hw) in enumerate(checked):
      groups.setdefault(canvas_hw, []).append(i)

    results: list[dict | None] = [None] * len(checked)
    for canvas_hw, members in groups.items():
      for start in range(0, len(members), self.batch_size):
        chunk = members[start:start + self.batch_size]
        padded, infos = zip(*(transforms.preprocess(checked[i][0], self.input_cfg, canvas_hw) for i in chunk))
        batch, batch_info = self._pad_batch(padded, infos, canvas_hw)
        out = jax.device_get(self.infer_batch(batch, batch_info))
        for j, (i, info) in enumerate(zip(chunk, infos)):
          results[i] = self.postprocess({k: np.asarray(v[j]) for k, v in out.items()}, info)
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
    out = self.program(self.variables, images, image_info)
    missing = [k for k in self._expected_keys() if k not in out]
    if missing:
      raise ValueError(f"infer_fn returned no {missing}; it returned {sorted(out)}")
    return {k: out[k] for k in self._expected_keys()}

  def _check(self, image, index: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Validate image `index` (dtype, shape, values, and that its resized size fits a canvas), so that a bad
    image fails before any batch runs. Returns it as uint8 or float32, and its canvas."""
    name = f"image {index}"
    image = transforms.check_image(image, name=name)
    try:
      canvas_hw = transforms.eval_canvas(*image.shape[:2], self.input_cfg)
    except ValueError as e:
      raise ValueError(f"{name} ({image.shape[0]}x{image.shape[1]}): {e}") from e
    return image, canvas_hw

  def _expected_keys(self) -> tuple[str, ...]:
    keys = _REQUIRED_KEYS
    if self.mask_on:
      keys += ("masks",)
    if self.keypoint_on:
      keys += ("keypoints",)
    return keys

  def _pad_batch(self, canvases, infos, canvas_hw):
    """Stack a (possibly short) batch of one canvas and pad it to batch_size.

    Returns images (batch_size, canvas_h, canvas_w, 3) float32 and image_info (batch_size, 6) float32. Padding
    images are zeros described as a full-canvas image at scale 1, so the model sees a well-formed (blank) image
    rather than one of size 0 (divisions by the valid size stay finite).
    """
    pad = self.batch_size - len(canvases)
    images = np.stack(canvases)
    info = np.stack(infos)
    if pad:
      canvas_h, canvas_w = canvas_hw
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

  @classmethod
  def from_checkpoint(cls, path, *, config=None, batch_size: int = 1) -> Predictor:
    """A Predictor for the checkpoint at `path`: anything `checkpoint.load_inference` reads (converted weights, a
    training workdir, one of its steps).

    config: None runs the model with the config saved with the checkpoint (model, input settings, class names:
      `self.config.model.class_names`). A given config must agree with the saved one in every model field but the
      class names, which come from the checkpoint (`checkpoint.inference_config`: ValueError naming the fields
      that differ); it is copied, not modified. A checkpoint saved without a config needs one.
    batch_size: as in the constructor.
    """
    from mrcnn_jax import checkpoint  # pylint: disable=import-outside-toplevel

    variables, saved = checkpoint.load_inference(path)
    config = checkpoint.inference_config(saved, config, where=f"checkpoint {path}", given="the given config")
    return cls(config, variables, batch_size=batch_size)


def to_coco_results(predictions: Sequence[dict], image_ids: Sequence, *, category_ids=None,
                    keypoint_offset: float = 0.5) -> list[dict]:
  """Predictor outputs -> COCO result dicts, ready for `json.dump` and `COCO.loadRes`.

  Args:
    predictions: per image, a dict as `Predictor.__call__` returns it: boxes (n, 4) XYXY, scores (n,),
      labels (n,), and optionally masks (n, H, W) bool and keypoints (n, 17, 3) (x, y, score).
    image_ids: the COCO image id of each prediction, same length.
    category_ids: `category_ids[label]` is the COCO category id of a label (e.g. a list with index 0 for the
      background); None when the labels already are category ids.
    keypoint_offset: subtracted from keypoint x and y: the model's model.keypoint_head.coordinate_offset
      (`data.examples.keypoint_coordinate_offset`, what `evaluate` passes). COCO keypoint annotations are integer
      pixel indices; Detectron2 adds 0.5 to them when loading (so that a pixel's centre sits at +0.5, like box
      coordinates) and subtracts it again when writing results (`instances_to_coco_json`), and so do this library's
      training examples and evaluation under its Detectron2 configs. The default 0.5 is Detectron2's; torchvision's
      convention, the annotation coordinates as they are, is 0.0.

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
