r"""Train and evaluate: `python -m mrcnn_jax.main --config=configs/FILE.py[:arg] --workdir=DIR [--config.key=value ...]`.

The config is an ml_collections file, locked, so a misspelt override fails before anything runs. Restarting with the
same workdir resumes from its newest checkpoint. On a TPU pod or a multi-node GPU cluster, run the same command on
every host with `--distributed` (jax.distributed.initialize: it finds the coordinator itself on Cloud TPU and
under SLURM; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID); each host then reads its
own shard of the data and the global batch is split over all devices.

The job (`run`): with `dataset.name == "shapes"` the synthetic set is generated first unless it is already there
(that config refuses dataset paths: it would not read them); then training (evaluating every train.eval_every
steps), a final COCO evaluation of the held-out set whose AP table is printed and written to
`<workdir>/eval/metrics.json`, and `<workdir>/predictions.png`, a grid of val images with the predicted boxes, masks,
labels and scores.

Exit status: 0 when the job is done; 1 on an error (one line on stderr naming the file or key, the traceback with
--debug or MRCNN_JAX_DEBUG=1); 143 (128 + SIGTERM, what a shell reports for a job SIGTERM killed) when SIGTERM
stopped the training: the checkpoint of the step reached is saved, nothing is evaluated, and the line "stopped at
step N of M; rerun the same command to resume" says so, so that a scheduler sees the job as not finished.
"""

from __future__ import annotations

import logging
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from mrcnn_jax import cli, host_memory

log = logging.getLogger(__name__)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file: configs/FILE.py[:arg].", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl, eval/ and predictions.png go; an existing one "
                    "is resumed.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
flags.DEFINE_enum("host_malloc", "reuse", list(host_memory.CHOICES), "reuse: keep freed host memory in the process "
                  "(mrcnn_jax.host_memory; on CPU, XLA's per-step buffers then stop page-faulting), system: glibc's "
                  "defaults.")
cli.define_debug_flag()
flags.mark_flags_as_required(["config", "workdir"])

PREDICTIONS_IMAGE = "predictions.png"
# The exit status of a run that SIGTERM stopped before train.max_iter (128 + 15, as a shell reports SIGTERM).
STOPPED_EXIT_STATUS = 143
# The dataset fields that name data on disk; the shapes config generates its own and sets them itself.
_DATA_PATHS = ("train_json", "train_image_dir", "val_json", "val_image_dir", "tfds_data_dir")
OWN_DATA_CONFIG = "configs/custom_coco.py"
# Libraries whose INFO lines (every orbax save, jax's backend probing) would drown the progress lines.
_QUIET_BELOW_WARNING = ("/orbax/", "/jax/_src/", "/grain/")


class _LibraryInfoFilter(logging.Filter):
  """Drops INFO and DEBUG records logged from `_QUIET_BELOW_WARNING`'s packages; their warnings still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _QUIET_BELOW_WARNING)
EVAL_DIR = "eval"


class TrainingStopped(Exception):
  """SIGTERM stopped the training before train.max_iter, after saving a checkpoint (`run` evaluates nothing then)."""

  def __init__(self, step: int, max_iter: int):
    super().__init__(f"stopped at step {step} of {max_iter}; rerun the same command to resume")
    self.step, self.max_iter = step, max_iter


def _shapes_root(config, workdir) -> pathlib.Path:
  """Where the shapes set goes: dataset.shapes.dir, or <workdir>/shapes_data."""
  s = config.dataset.shapes
  return (pathlib.Path(s.dir) if s.dir else pathlib.Path(workdir) / "shapes_data").absolute()


def _shapes_paths(config, workdir) -> dict[str, str]:
  """The dataset fields `prepare_shapes` sets, pointing at the shapes set's files."""
  from mrcnn_jax.data import shapes  # pylint: disable=import-outside-toplevel

  paths = shapes.dataset_paths(_shapes_root(config, workdir))
  return {"train_json": str(paths["train_annotations"]), "train_image_dir": str(paths["train_images"]),
          "val_json": str(paths["val_annotations"]), "val_image_dir": str(paths["val_images"])}


def check_shapes_dataset(config, workdir) -> None:
  """The shapes config generates its own data: dataset paths given with it (a user's own data) would be replaced by
  the shapes set, so they are an error naming them and the config for own data."""
  own = _shapes_paths(config, workdir)
  given = [k for k in _DATA_PATHS if config.dataset.get(k) and str(config.dataset.get(k)) != own.get(k)]
  if given:
    fields = ", ".join(f"config.dataset.{k}" for k in given)
    raise ValueError(f"{fields} given with a config whose dataset.name is 'shapes': that config generates its own "
                     f"synthetic shapes set and would train on it instead; for your own COCO-format data use "
                     f"--config={OWN_DATA_CONFIG} with the same --config.dataset.* overrides")


def prepare_shapes(config, workdir) -> None:
  """Generate the shapes set named by config.dataset.shapes (in its `dir`, or `<workdir>/shapes_data`) unless it is
  already complete there, and point config.dataset's train/val fields at it (`check_shapes_dataset` first)."""
  from mrcnn_jax.data import shapes  # pylint: disable=import-outside-toplevel

  check_shapes_dataset(config, workdir)
  s = config.dataset.shapes
  size = int(s.image_size)
  shapes.ensure_dataset(_shapes_root(config, workdir), int(s.num_train), int(s.num_val), int(s.seed), (size, size))
  for key, value in _shapes_paths(config, workdir).items():
    config.dataset[key] = value


def _has_val_data(config) -> bool:
  data = config.dataset
  return bool(data.get("tfds_data_dir") or (data.get("val_json") and data.get("val_image_dir")))


def _variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def write_predictions_image(config, variables, source, path, *, num_images: int = 8, cols: int = 4,
                            score_threshold: float = 0.5, min_side: int = 256) -> pathlib.Path:
  """A grid of the first `num_images` images of `source` with their predictions drawn (atomically written PNG).

  Small images (the 128 px shapes) are enlarged by an integer factor to at least `min_side` px first, so that the
  labels stay readable next to the shapes.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import predictor as predictor_lib  # pylint: disable=import-outside-toplevel
  from mrcnn_jax import visualize
  from mrcnn_jax.data.categories import class_names_for_config  # pylint: disable=import-outside-toplevel

  images = [source.load_image(record) for record in source.records[:num_images]]
  predictor = predictor_lib.Predictor(config, variables, batch_size=max(1, min(len(images), int(config.train.batch_size))))
  names = class_names_for_config(config)
  tiles = []
  for image, result in zip(images, predictor(images)):
    k = max(1, -(-min_side // min(image.shape[:2])))
    keep = result["scores"] >= score_threshold
    masks = result["masks"][keep].repeat(k, axis=1).repeat(k, axis=2) if "masks" in result else None
    keypoints = None
    if "keypoints" in result:
      keypoints = result["keypoints"][keep] * np.array([k, k, 1], np.float32)
    tiles.append(visualize.draw_instances(
        image.repeat(k, axis=0).repeat(k, axis=1), result["boxes"][keep] * k, result["labels"][keep],
        result["scores"][keep], masks=masks, keypoints=keypoints, class_names=names))
  return visualize.save_image(path, visualize.make_grid(tiles, cols))


def run(config, workdir) -> dict | None:
  """The whole job in `workdir`; returns the final evaluation metrics (None without a val set).

  Raises TrainingStopped when SIGTERM stopped the training (checkpoint saved, nothing evaluated).
  """
  import jax  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import coco_eval, config_from_data, evaluate, train  # pylint: disable=import-outside-toplevel

  workdir = pathlib.Path(workdir)
  if config.dataset.name == "shapes":
    prepare_shapes(config, workdir)
  # Fields a config leaves unset (configs/custom_coco.py) follow the dataset; the choices are printed.
  for line in config_from_data.derive(config):
    if jax.process_index() == 0:
      print(f"from the data: {line}", flush=True)
  evaluate_fn, val_source = None, None
  if _has_val_data(config):
    val_source = evaluate.load_eval_source(config)

    def evaluate_fn(state, step):
      return evaluate.evaluate(config, _variables(state), val_source, workdir / EVAL_DIR / f"step_{step}")

  state = train.train(config, workdir, evaluate_fn=evaluate_fn)
  if int(state.step) < int(config.train.max_iter):
    raise TrainingStopped(int(state.step), int(config.train.max_iter))
  if val_source is None:
    log.info("no evaluation set configured (config.dataset.val_json / val_image_dir / tfds_data_dir); done")
    return None
  variables = jax.device_get(_variables(state))
  metrics = evaluate.evaluate(config, variables, val_source, workdir / EVAL_DIR)
  table = coco_eval.format_table(metrics)
  if jax.process_index() == 0:
    print(f"COCO evaluation of {len(val_source.records)} held-out images (step {int(state.step)}):\n{table}",
          flush=True)
    image = write_predictions_image(config, variables, val_source, workdir / PREDICTIONS_IMAGE)
    print(f"checkpoint: {workdir / 'checkpoints'}\nmetrics: {workdir / EVAL_DIR / 'metrics.json'}\n"
          f"predictions: {image}", flush=True)
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  host_memory.configure(FLAGS.host_malloc)  # first: before JAX or the data loaders start threads
  import jax
  from absl import logging as absl_logging

  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  if FLAGS.distributed:
    jax.distributed.initialize()
  log.info("jax %s, %d processes, %d devices (%s)", jax.__version__, jax.process_count(), jax.device_count(),
           jax.devices()[0].device_kind)
  try:
    run(FLAGS.config, FLAGS.workdir)
  except TrainingStopped as stopped:
    print(stopped, file=sys.stderr, flush=True)
    return STOPPED_EXIT_STATUS
  return 0


if __name__ == "__main__":
  cli.run("mrcnn_jax.main", main)
