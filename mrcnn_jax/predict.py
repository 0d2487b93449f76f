"""The predict command line: overlays `<out>/<image stem>.png` and `<out>/predictions.json` for image files,

  python -m mrcnn_jax.predict --checkpoint=DIR --images a.jpg b.png photos/ 'tiles/*.png' --out=DIR \
      [--config=configs/FILE.py] [--score_threshold=0.5] [--batch_size=N] [--strict] [--config.key=value ...]

where DIR is anything `checkpoint.load_inference` reads (converted weights, a training workdir, one of its steps).
--images takes image files, directories (their image files, by extension, sorted) and glob patterns (expanded here,
sorted, so quoting them from the shell works too).

The config is the one saved with the checkpoint (model, input settings, class names) unless --config is given; a
--config must agree with the checkpoint's model fields except those given as --config.model.* overrides
(`checkpoint.inference_config`), and the labels are named by the checkpoint's class names.

An image that cannot be read (missing, corrupt, an unsupported pixel format, too large for the canvas) does not stop
the others: every readable image gets its results, each bad one is named in one warning line and listed under
"errors" in predictions.json, and the command exits with status 1 at the end. With --strict every image is checked
first and the first bad one stops the command before the model runs (nothing written). Other errors print one line
(the traceback with --debug). The library side is `mrcnn_jax.predictor.Predictor`.
"""

from __future__ import annotations

import glob
import logging
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from mrcnn_jax import atomic
from mrcnn_jax.data import transforms
from mrcnn_jax.data.categories import class_names_for_config
from mrcnn_jax.predictor import Predictor, to_coco_results  # noqa: F401  (re-exported: mrcnn_jax.predict.Predictor)

log = logging.getLogger(__name__)

# What a directory given to --images contributes: its files with these extensions (any case), sorted by name.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# Errors of reading or checking one image that skip that image (FileNotFoundError and IsADirectoryError are
# OSErrors); anything else is a bug and propagates.
_IMAGE_ERRORS = (OSError, ValueError)


def expand_image_args(args: Sequence[str]) -> list[str]:
  """The image files named by `args`: a directory gives its image files (IMAGE_EXTENSIONS, sorted), a glob
  pattern the files it matches (sorted), anything else itself (a missing file is reported when it is read).

  Raises ValueError naming a directory without image files or a pattern that matches no file.
  """
  paths = []
  for arg in args:
    arg = os.fspath(arg)
    if os.path.isdir(arg):
      found = sorted(str(p) for p in pathlib.Path(arg).iterdir()
                     if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
      if not found:
        raise ValueError(f"--images directory {arg} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
      paths.extend(found)
    elif any(c in arg for c in "*?[") and not os.path.exists(arg):
      found = sorted(p for p in glob.glob(arg) if os.path.isfile(p))
      if not found:
        raise ValueError(f"--images pattern {arg} matches no file")
      paths.extend(found)
    else:
      paths.append(arg)
  return paths


def check_overlay_names(image_paths: Sequence[str]) -> None:
  """ValueError unless there are images and their stems differ: each names its overlay, <stem>.png."""
  if not image_paths:
    raise ValueError("no images given")
  stems = {}
  for path in image_paths:
    stem = pathlib.Path(path).stem
    if stem in stems:
      raise ValueError(f"image files {stems[stem]} and {path} would both write the overlay {stem}.png")
    stems[stem] = path


def _resized_size_error(input_cfg, height: int, width: int) -> str | None:
  """Why an image of this size cannot be predicted (it fits none of the config's canvases once resized), or None.
  The one place the predict command reads the canvas setting."""
  try:
    transforms.eval_canvas(height, width, input_cfg)
  except ValueError as e:
    return f"{height}x{width}: {e}"
  return None


def check_image_file(path: str, input_cfg) -> tuple[int, int]:
  """Decode the image file (`images.read_image`, the decoder of training and evaluation) and check that it fits the
  config's canvas once resized; returns its (height, width). Raises FileNotFoundError / ValueError naming it."""
  from mrcnn_jax.data.images import read_image  # pylint: disable=import-outside-toplevel

  height, width = read_image(path).shape[:2]
  problem = _resized_size_error(input_cfg, height, width)
  if problem:
    raise ValueError(f"image file {path}: {problem}")
  return height, width


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
                  batch_size: int = 1, class_names=None, strict: bool = False) -> tuple[pathlib.Path, dict[str, str]]:
  """Run the model on image files; write `<out_dir>/<stem>.png` overlays and `<out_dir>/predictions.json`.

  Args:
    config: the ml_collections config (`input`, `model`; `dataset` for class names).
    variables: the model's variables, or a function returning them, called once the images are checked (so that
      bad files are known before a large checkpoint loads).
    image_paths: image files (any format `images.read_image` reads); their stems must differ, since they name the
      overlays.
    out_dir: created if missing; existing files of the same names are replaced (each atomically).
    score_threshold: detections scoring below it are neither drawn nor written.
    batch_size: images per model call.
    class_names: names indexed by label; None looks them up from the config (`class_names_for_config`).
    strict: a bad image (missing, undecodable, too large for the canvas) raises, naming it, before the model is
      built and before anything is written. Otherwise it is skipped with a one-line warning and listed in the
      JSON's "errors", and the other images run.

  predictions.json: {"score_threshold", "label_space", "class_names", "images": {<path as given>: {"height",
  "width", "overlay", "instances": [{"label", "name", "score", "box" [x1, y1, x2, y2] in original pixels,
  "segmentation" (COCO RLE), "keypoints" [[x, y, score] * 17]}, ...]}}, "errors": {<path>: <message>}}.

  Every image is decoded and checked before the model is built; then it is decoded again when its batch runs (no
  image list is held in memory). Returns (the JSON's path, the errors: path -> message, empty when all ran).
  Raises ValueError when no image at all can be read (nothing is written then).
  """
  from mrcnn_jax import visualize  # pylint: disable=import-outside-toplevel
  from mrcnn_jax.data.images import read_image  # pylint: disable=import-outside-toplevel

  image_paths = [os.fspath(p) for p in image_paths]
  check_overlay_names(image_paths)
  sizes, errors = {}, {}

  def skip(path, error):
    errors[path] = str(error)
    log.warning("skipped: %s", error)

  for path in image_paths:
    try:
      sizes[path] = check_image_file(path, config.input)
    except _IMAGE_ERRORS as e:
      if strict:
        raise
      skip(path, e)
  good = [p for p in image_paths if p in sizes]
  if not good:
    raise ValueError(f"none of the {len(image_paths)} images could be read; the first: {errors[image_paths[0]]}")
  names = class_names_for_config(config) if class_names is None else list(class_names)

  predictor = Predictor(config, variables() if callable(variables) else variables, batch_size=batch_size)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails on its inputs leaves nothing behind
  images_json = {}
  for start in range(0, len(good), predictor.batch_size):
    paths, images = [], []
    for path in good[start:start + predictor.batch_size]:
      try:  # checked above, but a file can change in between
        images.append(read_image(path, sizes[path]))
        paths.append(path)
      except _IMAGE_ERRORS as e:
        skip(path, e)
    for path, image, result in zip(paths, images, predictor(images) if images else []):
      result = _keep_scores(result, score_threshold)
      overlay = f"{pathlib.Path(path).stem}.png"
      drawn = visualize.draw_instances(image, result["boxes"], result["labels"], result["scores"],
                                       masks=result.get("masks"), keypoints=result.get("keypoints"),
                                       class_names=names)
      visualize.save_image(out_dir / overlay, drawn)
      height, width = sizes[path]
      images_json[path] = {"height": height, "width": width, "overlay": overlay,
                           "instances": _instances_json(result, names)}
  json_path = out_dir / "predictions.json"
  atomic.write_json(json_path, {
      "score_threshold": float(score_threshold), "label_space": str(config.model.label_space),
      "class_names": names, "images": images_json, "errors": {p: errors[p] for p in image_paths if p in errors}})
  return json_path, errors


def _define_flags():
  """Flags exist only when this module runs as a program, so importing it (as the library does) defines none."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import cli  # pylint: disable=import-outside-toplevel

  cli.define_checkpoint_flags()
  flags.DEFINE_multi_string("images", None, "Image files, directories (their image files) or glob patterns; "
                            "several after one --images, or --images repeated.")
  flags.DEFINE_string("out", None, "Output directory: <stem>.png overlays and predictions.json.")
  flags.DEFINE_float("score_threshold", 0.5, "Detections below this score are neither drawn nor written.")
  flags.DEFINE_integer("batch_size", 1, "Images per model call.")
  flags.DEFINE_bool("strict", False, "Check every image first and stop at the first bad one, before the model "
                    "runs; by default bad images are skipped, listed in predictions.json, and the exit status is 1.")
  flags.mark_flags_as_required(["checkpoint", "images", "out"])


def main(argv):
  from absl import app, flags  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import checkpoint, cli  # pylint: disable=import-outside-toplevel

  f = flags.FLAGS
  # `--images a.jpg b.png` leaves b.png (and the rest) as positional arguments: they are images too.
  stray = [a for a in argv[1:] if a.startswith("-")]
  if stray:
    raise app.UsageError(f"unexpected arguments: {stray}")
  image_paths = expand_image_args(list(f.images) + list(argv[1:]))
  check_overlay_names(image_paths)
  # The small saved config first: the images are checked against its input settings before the variables load.
  config = cli.config_for_checkpoint(f.checkpoint, checkpoint.load_saved_config(f.checkpoint))
  path, errors = predict_files(config, lambda: checkpoint.load_inference(f.checkpoint)[0], image_paths, f.out,
                               score_threshold=f.score_threshold, batch_size=f.batch_size, strict=f.strict)
  done = len(image_paths) - len(errors)
  log.info("wrote %d overlays and %s", done, path)
  if errors:
    print(f"mrcnn_jax.predict: {len(errors)} of {len(image_paths)} images could not be read (listed under "
          f"\"errors\" in {path}): {', '.join(errors)}", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  from mrcnn_jax import cli as _cli  # pylint: disable=import-outside-toplevel

  _define_flags()
  _cli.run("mrcnn_jax.predict", main)
