r"""COCO evaluation: batched inference over a dataset, a COCO results file, and COCOeval's scores in Detectron2's names.

  source --make_eval_batches--> batches --Predictor.infer_batch (devices)--> fixed-size detections
         --Predictor.postprocess + to_coco_results (a host thread)--> COCO result dicts, one per detection
         --coco_eval.score_coco: bbox, segm (mask head on), keypoints (keypoint head on)--> {"bbox/AP": 38.6, ...}

Command line (the checkpoint is any directory `checkpoint.load_inference` takes; the config's dataset section names
the data: val_json + val_image_dir, or a prepared tfds `coco_instances` set in tfds_data_dir):

  python -m mrcnn_jax.evaluate --checkpoint=WORKDIR [--output_dir=OUT]
  python -m mrcnn_jax.evaluate --config=configs/mask_rcnn_R50_FPN_1x.py --checkpoint=DIR [--output_dir=OUT] \
      --config.dataset.val_json=COCO/annotations/instances_val2017.json --config.dataset.val_image_dir=COCO/val2017

Without --config the config saved with the checkpoint is used, model, class names and val set (a training run's
own val set). A --config must agree with the checkpoint's model fields, except those given as --config.model.*
overrides (`checkpoint.inference_config`); its val set, when it names none, is the checkpoint's. The dataset must
have the model's number of categories. Errors print one line (the traceback with --debug).

From Python (a notebook, or the trainer after its last step): `metrics = evaluate(config, variables, source, out)`.

Overlap: the batch is sharded over the local devices (variables replicated); batch i + 1 is read, resized and
dispatched while one host thread waits for batch i, maps it back to original pixels, pastes its masks and RLE-encodes
them (`Predictor.postprocess`, `predictor.to_coco_results`).

Output files, each written atomically (temporary file + os.replace):
  coco_instances_results.json   every detection, as Detectron2's COCOEvaluator writes it: one file holding bbox,
                                score and category_id, plus segmentation (RLE) when the mask head is on and keypoints
                                when the keypoint head is on;
  metrics.json                  {"metrics": the returned dict, NaN written as null, "num_images", "num_detections",
                                "max_detections", "iou_types"}.

Scoring follows Detectron2's COCOEvaluator (the images scored, maxDets, the metric names and scale): see
`mrcnn_jax.coco_eval`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import pathlib
import time
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mrcnn_jax import atomic
from mrcnn_jax.coco_eval import format_table, ground_truth, iou_types, score_coco
from mrcnn_jax.data.examples import keypoint_coordinate_offset
from mrcnn_jax.mesh import make_mesh
from mrcnn_jax.predictor import Predictor, to_coco_results

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS

RESULTS_FILE = "coco_instances_results.json"
METRICS_FILE = "metrics.json"
_DATA_AXIS = "data"
# Batches whose host work may wait at once: bounds the host memory held by full-image masks.
_MAX_PENDING = 2


# --------------------------------------------------------------------------------------------------------------------
# Inference over a dataset.
# --------------------------------------------------------------------------------------------------------------------


def run_inference(predictor: Predictor, batches: Iterable[dict], *, category_ids=None, keypoint_offset: float = 0.5,
                  batch_sharding=None) -> tuple[list[dict], list[int]]:
  """COCO results of every valid image of `batches`, device work overlapping the host's.

  Args:
    predictor: runs the model (`infer_batch`) and maps one image's detections to original pixels (`postprocess`).
    batches: dicts as `data.pipeline.make_eval_batches` yields them: image (B, Hc, Wc, 3) float32, image_info (B, 6)
      float32, image_id (B,) int, valid (B,) bool (slots past the data's end are False and dropped).
    category_ids, keypoint_offset: passed to `predictor.to_coco_results` (`evaluate` passes the config's keypoint
      offset, `examples.keypoint_coordinate_offset`).
    batch_sharding: where image and image_info go before the model runs (e.g. NamedSharding(mesh, P("data"))); None
      leaves them to jit (the default device).

  Returns:
    (results, image_ids): the COCO result dicts of all detections, in batch order; the image id of every valid slot,
    in order, repeats included (so that the caller can check the set was covered exactly once).
  """

  def finish(out, batch):
    out = jax.device_get(out)  # waits for the device here, in the worker thread
    slots = np.flatnonzero(np.asarray(batch["valid"], bool))
    ids = [int(i) for i in np.asarray(batch["image_id"])[slots]]
    predictions = [predictor.postprocess({k: np.asarray(v[j]) for k, v in out.items()}, batch["image_info"][j])
                   for j in slots]
    return ids, to_coco_results(predictions, ids, category_ids=category_ids, keypoint_offset=keypoint_offset)

  results, image_ids = [], []

  def collect(future):
    ids, batch_results = future.result()
    image_ids.extend(ids)
    results.extend(batch_results)

  # One worker: batches finish in order, and the host work of batch i runs while batch i + 1 is read and computed.
  with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-postprocess") as pool:
    pending = collections.deque()
    try:
      for batch in batches:
        images, info = batch["image"], batch["image_info"]
        if batch_sharding is not None:
          images, info = jax.device_put((images, info), batch_sharding)
        pending.append(pool.submit(finish, predictor.infer_batch(images, info), batch))
        while len(pending) > _MAX_PENDING:
          collect(pending.popleft())
      while pending:
        collect(pending.popleft())
    finally:
      for future in pending:
        future.cancel()
  return results, image_ids


def check_image_ids(expected_ids: Sequence[int], inferred_ids: Sequence[int]) -> None:
  """Raise ValueError unless every expected image got exactly one inference pass and no other image did.

  The message names the image ids (the first 20 of each kind, and the counts): an evaluation that scores other images
  than the set's reports a wrong AP (a missed image's objects count as misses, an unscored one's false positives
  vanish).
  """
  expected = [int(i) for i in expected_ids]
  counts = collections.Counter(int(i) for i in inferred_ids)
  missing = [i for i in expected if i not in counts]
  unknown = sorted(set(counts) - set(expected))
  repeated = sorted(i for i, n in counts.items() if n > 1)
  problems = []
  if missing:
    problems.append(f"{len(missing)} of {len(expected)} images got no inference pass: image ids {_some(missing)}")
  if unknown:
    problems.append(f"{len(unknown)} inferred images are not in the ground truth: image ids {_some(unknown)}")
  if repeated:
    problems.append(f"{len(repeated)} images were inferred more than once: image ids {_some(repeated)}")
  if problems:
    raise ValueError("; ".join(problems) + " (the evaluation must see each image of the set exactly once)")


def _some(ids: Sequence[int], limit: int = 20) -> str:
  return ", ".join(str(i) for i in ids[:limit]) + (", ..." if len(ids) > limit else "")


# --------------------------------------------------------------------------------------------------------------------
# Output files.
# --------------------------------------------------------------------------------------------------------------------


def write_json_atomic(path, obj) -> pathlib.Path:
  """json.dump `obj` to `path` atomically (`mrcnn_jax.atomic.write_json`). Returns the path."""
  return atomic.write_json(path, obj)


def _json_metrics(metrics: dict[str, float]) -> dict:
  return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------------------------------
# The whole evaluation.
# --------------------------------------------------------------------------------------------------------------------


def evaluate(config, variables, source, output_dir, *, batch_size: int | None = None, infer_fn=None,
             keypoint_offset: float | None = None, devices=None) -> dict[str, float]:
  """Run the model over every image of `source`, write the COCO results, score them; returns the metrics.

  Args:
    config: the ConfigDict of the model (model, input): what is scored (`iou_types`), D
      (model.roi_heads.detections_per_image), the label space.
    variables: {"params": ..., "batch_stats": ...}, numpy or jax arrays (replicated here over `devices`).
    source: `coco.CocoSource` (scored against its whole annotation file) or `tfds_coco.TfdsSource` (against its
      records, `coco_eval.coco_from_records`); anything `data.pipeline.make_eval_batches` takes, with `category_map`
      and either `coco` or records to score against.
    output_dir: where RESULTS_FILE and METRICS_FILE go (created); None writes nothing.
    batch_size: images per device step, a multiple of the number of devices; default one image per device.
    infer_fn: passed to the Predictor (default `build_infer(config)`).
    keypoint_offset: subtracted from predicted keypoints (`to_coco_results`); default the config's
      model.keypoint_head.coordinate_offset (`examples.keypoint_coordinate_offset`), the offset its training added.
    devices: the devices the batch is sharded over; default this process's local devices. Evaluation does not
      split the set across processes: in a multi-process run, call it from one process, with host (or fully
      addressable) variables.

  Returns:
    The flat metrics dict (module docstring). Raises ValueError naming the image ids when inference did not cover
    the ground truth's images exactly once (e.g. a source loaded with train=True, which skips empty images).
  """
  devices = list(jax.local_devices() if devices is None else devices)
  batch_size = len(devices) if batch_size is None else int(batch_size)
  if batch_size < 1 or batch_size % len(devices):
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of the number of devices {len(devices)}")
  keypoint_offset = keypoint_coordinate_offset(config) if keypoint_offset is None else float(keypoint_offset)
  coco_gt = ground_truth(source)
  types = iou_types(config)
  if "segm" in types and any("segmentation" not in a for a in coco_gt.dataset["annotations"]):
    log.warning("the ground truth has annotations without segmentation: segm is not scored")
    types = tuple(t for t in types if t != "segm")

  from mrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  mesh = make_mesh(devices, _DATA_AXIS)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))  # the Predictor keeps arrays already placed
  predictor = Predictor(config, variables, infer_fn=infer_fn, batch_size=batch_size)
  category_ids = source.category_map.label_to_category_id if config.model.label_space == "contiguous" else None

  start = time.perf_counter()
  batches = pipeline.make_eval_batches(source, config.input, batch_size)
  results, inferred = run_inference(predictor, batches, category_ids=category_ids, keypoint_offset=keypoint_offset,
                                    batch_sharding=NamedSharding(mesh, P(_DATA_AXIS)))
  image_ids = sorted(coco_gt.getImgIds())
  check_image_ids(image_ids, inferred)
  seconds = time.perf_counter() - start
  log.info("inference on %d images: %.1f s (%.3f s / image), %d detections", len(inferred), seconds,
           seconds / max(len(inferred), 1), len(results))

  if output_dir is not None:
    write_json_atomic(pathlib.Path(output_dir) / RESULTS_FILE, results)
  max_dets = int(config.model.roi_heads.detections_per_image)
  metrics = score_coco(coco_gt, results, image_ids, iou_types=types, max_detections=max_dets)
  if output_dir is not None:
    write_json_atomic(pathlib.Path(output_dir) / METRICS_FILE, {
        "metrics": _json_metrics(metrics), "num_images": len(image_ids), "num_detections": len(results),
        "max_detections": max_dets, "iou_types": list(types)})
  # One line here; callers print `format_table(metrics)` where a table belongs (the CLI, the main job, a notebook).
  log.info("COCO evaluation of %d images: %s", len(image_ids),
           ", ".join(f"{t}/AP {metrics[f'{t}/AP']:.2f}" for t in types if f"{t}/AP" in metrics))
  return metrics


# --------------------------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------------------------


def load_eval_source(config):
  """The evaluation set of `config.dataset`: split val_split of the prepared tfds set in tfds_data_dir when that is
  set, else val_json with its images in val_image_dir (every image kept, `load_coco(train=False)`).

  Raises ValueError when none is set, or when the set's categories do not fit config.model's labels
  (`categories.check_dataset_matches_model`: the number of categories against model.num_classes).
  """
  from mrcnn_jax.data import categories  # pylint: disable=import-outside-toplevel

  data = config.dataset
  if data.get("tfds_data_dir"):
    from mrcnn_jax.data import tfds_coco  # pylint: disable=import-outside-toplevel

    split = data.get("val_split") or "val2017"
    source = tfds_coco.load_tfds_source(data.tfds_data_dir, split, train=False,
                                        config=data.get("tfds_config") or "instances")
    where = f"{source.dataset_dir} split {split!r} (config.dataset.tfds_data_dir)"
  else:
    if not data.get("val_json") or not data.get("val_image_dir"):
      raise ValueError("config.dataset.val_json and config.dataset.val_image_dir must be set (COCO-format "
                       "annotations and their image folder), or config.dataset.tfds_data_dir (a prepared "
                       "coco_instances set)")
    from mrcnn_jax.data import coco  # pylint: disable=import-outside-toplevel

    source = coco.load_coco(data.val_json, data.val_image_dir, train=False)
    where = f"{data.val_json} (config.dataset.val_json)"
  categories.check_dataset_matches_model(config, source.category_map, where)
  return source


def default_output_dir(checkpoint_path) -> pathlib.Path:
  """<workdir>/eval for a training checkpoint (workdir, its checkpoints/ or a step in it), <checkpoint>/eval for a
  variables checkpoint."""
  from mrcnn_jax import checkpoint, train_checkpoint  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(checkpoint_path).expanduser().absolute()
  if not (path / checkpoint.VARIABLES_DIR).is_dir():
    if path.name.isdigit() and path.parent.name == train_checkpoint.CHECKPOINTS_DIR:
      path = path.parent.parent
    elif path.name == train_checkpoint.CHECKPOINTS_DIR:
      path = path.parent
  return path / "eval"


# The dataset fields that name a val set; a --config naming none takes the checkpoint's.
_VAL_FIELDS = ("val_json", "val_image_dir", "tfds_data_dir", "tfds_config", "val_split")


def _with_saved_val_set(config, saved: dict | None):
  """`config`, with the val set of the checkpoint's saved config when `config` names none (a training run's own)."""
  data = config.dataset
  if data.get("val_json") or data.get("tfds_data_dir"):
    return config
  saved_data = (saved or {}).get("dataset") or {}
  if not (saved_data.get("val_json") or saved_data.get("tfds_data_dir")):
    return config
  for key in _VAL_FIELDS:
    if saved_data.get(key) is not None and key in data:
      data[key] = saved_data[key]
  log.info("the val set of the checkpoint's config: %s", data.get("val_json") or data.get("tfds_data_dir"))
  return config


def main(argv):
  from absl import app  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import checkpoint, cli  # pylint: disable=import-outside-toplevel

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  variables, saved_config = checkpoint.load_inference(FLAGS.checkpoint)
  config = cli.config_for_checkpoint(FLAGS.checkpoint, saved_config)
  if FLAGS.config is not None:
    config = _with_saved_val_set(config, saved_config)
  output_dir = pathlib.Path(FLAGS.output_dir) if FLAGS.output_dir else default_output_dir(FLAGS.checkpoint)
  source = load_eval_source(config)
  metrics = evaluate(config, variables, source, output_dir, batch_size=FLAGS.batch_size or None,
                     keypoint_offset=FLAGS.keypoint_offset)
  print(format_table(metrics))
  print(f"results and metrics written to {output_dir}")
  return 0


def _define_flags():
  """The command line's flags; defined only when run as a program, so that importing this module (the trainer, a
  notebook) adds nothing to absl's global flags."""
  from mrcnn_jax import cli  # pylint: disable=import-outside-toplevel

  cli.define_checkpoint_flags("the config saved with the checkpoint (its model, class names and val set)")
  flags.DEFINE_string("output_dir", None, "Where the results and metrics.json go; default <workdir>/eval for a "
                      "training checkpoint, <checkpoint>/eval for a variables checkpoint.")
  flags.DEFINE_integer("batch_size", 0, "Images per step over the local devices; 0: one per device.")
  flags.DEFINE_float("keypoint_offset", None, "Subtracted from predicted keypoints' x and y; default the config's "
                     "model.keypoint_head.coordinate_offset (0.5 in Detectron2's convention, 0 in torchvision's).")
  flags.mark_flags_as_required(["checkpoint"])


if __name__ == "__main__":
  from mrcnn_jax import cli

  _define_flags()
  cli.run("mrcnn_jax.evaluate", main)
