"""The predict command line: overlays `<out>/<image stem>.png` and `<out>/predictions.json` for image files,

  python -m mrcnn_jax.predict --config=configs/FILE.py --checkpoint=DIR --images a.jpg b.png ... --out=DIR \\
      [--score_threshold=0.5] [--batch_size=N] [--config.key=value ...]

where DIR is anything `checkpoint.load_inference` reads (converted weights, a training workdir, one of its steps).
The library side is `mrcnn_jax.predictor.Predictor`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from mrcnn_jax import atomic
from mrcnn_jax.data import transforms
from mrcnn_jax.data.categories import class_names_for_config
from mrcnn_jax.predictor import Predictor, to_coco_results  # noqa: F401  (re-exported: mrcnn_jax.predict.Predictor)


def _check_image_files(paths: Sequence[str], input_cfg) -> list[tuple[int, int]]:
  """Decode every image once, so that a missing, corrupt or oversized file fails naming it before any model code
  runs; returns their (height, width)."""
  from mrcnn_jax.data import coco  # pylint: disable=import-outside-toplevel

  sizes = []
  for path in paths:
    height, width = coco.read_image(path).shape[:2]
    try:
      transforms.eval_canvas(height, width, input_cfg)
    except ValueError as e:
      raise ValueError(f"image file {path} ({height}x{width}): {e}") from None
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
