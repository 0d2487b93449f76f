"""The training loop: `train(config, workdir)` runs, or resumes, a run until train.max_iter.

  config.dataset --load_train_source--> source --check_training_source--> checked, class names taken from it
  source --data.pipeline.make_train_loader--> batches --to_global_batch--> the jitted step (`train_step`)
  every train.checkpoint_every steps: state, data position, config --TrainCheckpointer--> <workdir>/checkpoints
  every train.log_every steps: metrics --train_log--> console, <workdir>/metrics.jsonl, TensorBoard

What it puts together: the state and the optimizer (`mrcnn_jax.train_state`), the step (`mrcnn_jax.train_step`), the
checkpoints (`mrcnn_jax.train_checkpoint`), SIGTERM (`mrcnn_jax.preemption`) and the logs (`mrcnn_jax.train_log`).
The loop's own decisions are here: when to log, save and evaluate, and when to stop (a non-finite loss, SIGTERM).
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mrcnn_jax.mesh import make_mesh
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.train_state import TrainState, create_train_state, init_from_pretrained
from mrcnn_jax.train_step import jit_train_step

log = logging.getLogger(__name__)


def load_train_source(config):
  """The training set of `config.dataset`: split train_split of the prepared tfds set in tfds_data_dir when that is
  set, else train_json with its images in train_image_dir. With the keypoint head on, images with fewer visible
  keypoints than model.keypoint_head.min_visible_per_image are skipped."""
  data = config.dataset
  keypoints = config.model.keypoint_head
  min_keypoints = int(keypoints.get("min_visible_per_image") or 0) if keypoints.enabled else 0
  if data.get("tfds_data_dir"):
    from mrcnn_jax.data import tfds_coco

    return tfds_coco.load_tfds_source(data.tfds_data_dir, data.train_split, train=True,
                                      skip_empty=data.filter_empty_annotations, config=data.tfds_config,
                                      min_keypoints_per_image=min_keypoints)
  if not data.train_json or not data.train_image_dir:
    raise ValueError("config.dataset.train_json and config.dataset.train_image_dir must be set (COCO-format "
                     "annotations and their image folder), or config.dataset.tfds_data_dir (a prepared "
                     "coco_instances set)")
  from mrcnn_jax.data import coco

  return coco.load_coco(data.train_json, data.train_image_dir, train=True,
                        skip_empty=data.filter_empty_annotations, min_keypoints_per_image=min_keypoints)


def _source_name(source) -> str:
  """How messages name a training source: its annotation file, or its prepared tfds split."""
  if getattr(source, "annotation_file", None):
    return f"{source.annotation_file} (the training set)"
  if getattr(source, "dataset_dir", None):
    return f"{source.dataset_dir} split {source.split!r} (the training set)"
  return "the training set"


def check_training_source(config, source) -> None:
  """What the trainer checks and takes from its source before the first step (`train` calls it).

  * The dataset's categories must fit the model's labels (`categories.check_dataset_matches_model`): ValueError
    naming both counts otherwise, rather than a non-finite loss a step later.
  * config.model.class_names becomes the dataset's category names (in place; logged when it replaces other names),
    so that the config saved with each checkpoint names the labels it was trained on.
  * Images with more instances than input.max_instances G: one warning with the counts (images, instances left out
    of training, the most in one image) and the setting to raise. Each example keeps G instances
    (`examples.select_instances`: crowd ones and then the smallest go first).
  A source without a `category_map` (a test's in-memory fake) skips the first two.
  """
  from mrcnn_jax.data import categories

  model = config.model
  category_map = getattr(source, "category_map", None)
  if category_map is not None:
    categories.check_dataset_matches_model(config, category_map, _source_name(source))
    if "class_names" in model:
      names = categories.dataset_class_names(category_map, model.label_space, int(model.num_classes))
      old = tuple(model.class_names)
      if old and old != names:
        # Same count, other names: a setting someone typed, worth a warning; another count: another dataset's.
        report = log.warning if len(old) == len(names) else log.info
        report("model.class_names: the training set's %s replace the config's %s", _short(names), _short(old))
      model.class_names = names
  limit = int(config.input.max_instances)
  counts = np.asarray([r.num_instances for r in source.records], np.int64)
  over = counts > limit
  if over.any():
    warnings.warn(
        f"{_source_name(source)}: {int(over.sum())} of {len(counts)} images have more instances than "
        f"input.max_instances = {limit} (up to {int(counts.max())} in one image): {int((counts - limit)[over].sum())} "
        f"instances are left out of training (of each such image, crowd ones first, then the smallest); raise "
        f"--config.input.max_instances={int(counts.max())} to train on all of them", stacklevel=2)


def _short(names, limit: int = 5) -> str:
  names = [str(n) for n in names]
  shown = ", ".join(names[:limit]) + (f", ... ({len(names)} names)" if len(names) > limit else "")
  return f"({shown})"


@jax.jit
def _all_finite(tree) -> jax.Array:
  """() bool: every element of every leaf of `tree` is finite."""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def _close_loader_iterator(data_iter) -> None:
  """Stop the loader's worker processes and free the shared memory of the batches they prepared ahead.

  grain's DatasetIterator.close() does both; grain 0.2's DataLoaderIterator has no close() of its own but wraps one
  (`_iterator`). Left to garbage collection at interpreter exit, the workers' shared memory outlives the process
  and Python's resource_tracker reports "leaked shared_memory objects".
  """
  close = getattr(data_iter, "close", None) or getattr(getattr(data_iter, "_iterator", None), "close", None)
  if close is None:
    return
  try:
    close()
  except Exception:  # closing must not hide the error that ended the run
    log.warning("closing the training input pipeline failed", exc_info=True)


def train(config, workdir, *, source=None, stop_after: int | None = None, evaluate_fn=None,
          devices=None) -> TrainState:
  """Train (or resume) in `workdir` until config.train.max_iter; returns the final state.

  Resumes from the newest checkpoint in `<workdir>/checkpoints`: parameters, optimizer state, step and the input
  iterator's position, so a resumed run sees the batches and the random sampling it would have seen without the
  interruption. SIGTERM (preemption) saves a checkpoint at the next step boundary and returns (the state's step is
  then below train.max_iter). A non-finite loss stops the run with FloatingPointError naming the step, its losses
  and the last good checkpoint; with train.skip_nonfinite the step's update is skipped instead, until
  train.max_consecutive_nonfinite steps in a row were non-finite. A checkpoint is never written of parameters that
  are not finite (FloatingPointError naming the step). `stop_after` ends the run after that many steps of this call
  (tests, notebooks).

  Before anything compiles, the source is checked against the config (`check_training_source`: the number of
  categories, the instances beyond input.max_instances) and config.model.class_names is set to the source's
  category names, in place. The input pipeline's worker processes are stopped when the run ends, however it ends.

  A fresh run (no checkpoint in the workdir) with init_from set starts from those weights where they fit the
  model (`init_from_pretrained`); a resumed run ignores it. Process 0 logs every train.log_every steps to the
  console, `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tensorboard` (`train_log.MetricWriters`).

  `evaluate_fn(state, step) -> dict` (optional) runs every train.eval_every steps before the last one (the caller
  evaluates the final state); its metrics are logged beside the losses. Every process calls it.

  `devices`: the devices the batch is sharded over (data parallel); default every device of every process. A
  subset serves a single-process run (one GPU of several, one CPU device); a multi-process run needs devices of
  every process, since each process feeds its own devices.
  """
  from mrcnn_jax import train_checkpoint, train_log
  from mrcnn_jax.data import pipeline
  from mrcnn_jax.preemption import install_preemption_handler

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tc = config.train
  # --- mesh and data ---------------------------------------------------------------------------------------------
  mesh = make_mesh(devices)
  if tc.batch_size % mesh.size:
    raise ValueError(f"train.batch_size={tc.batch_size} is not a multiple of the {mesh.size} devices it is sharded "
                     f"over")
  if int(tc.get("max_consecutive_nonfinite") or 0) < 1:
    raise ValueError(f"train.max_consecutive_nonfinite must be >= 1, got {tc.get('max_consecutive_nonfinite')!r}")
  data_iter = _training_input(config, source)
  # --- model, optimizer, restore ---------------------------------------------------------------------------------
  model = mask_rcnn.build_model(config, train=True)
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(create_train_state(config, jax.random.key(tc.seed)), replicated)
  ckpt = train_checkpoint.TrainCheckpointer(workdir, keep=tc.keep_checkpoints,
                                           save_interval_steps=tc.checkpoint_every)
  state = _restore_or_init(config, state, replicated, ckpt, data_iter)
  step = int(state.step)
  step_fn = jit_train_step(config, model, mesh)
  # --- loop ------------------------------------------------------------------------------------------------------
  # One set of writers for the whole run: process 0 logs (the metrics are replicated, every process holds the same
  # values): metrics.jsonl and TensorBoard events in <workdir>/tensorboard.
  writer = train_log.MetricWriters.for_workdir(workdir, start_step=step) if jax.process_index() == 0 else None
  preemption = install_preemption_handler()
  steps_done, nonfinite_in_a_row = 0, 0
  start = time.perf_counter()
  try:
    while step < tc.max_iter:
      t0 = time.perf_counter()
      batch = pipeline.to_global_batch(next(data_iter), mesh)
      data_seconds = time.perf_counter() - t0
      state, metrics = step_fn(state, batch)
      # The step holds on to its inputs until it is done. A batch kept past the loop (on CPU the arrays can share
      # the loader's shared memory) would outlive the loader, and its shared memory the process.
      del batch
      step += 1
      steps_done += 1
      if step % tc.log_every == 0 or step == tc.max_iter:  # before the checks below: a non-finite step is logged too
        _log_step(writer, step, tc.max_iter, metrics, (time.perf_counter() - start) / steps_done, data_seconds)
      nonfinite_in_a_row = _count_nonfinite(metrics, step, nonfinite_in_a_row, tc, ckpt)
      # A signal reaches one host; every process must stop (and save) at the same step: a collective check.
      stop = preemption.sync_requested() or (stop_after is not None and steps_done >= stop_after)
      if step % tc.checkpoint_every == 0 or step == tc.max_iter or stop:
        _save_checkpoint(ckpt, step, state, data_iter, config)
      if evaluate_fn is not None and tc.eval_every and step % tc.eval_every == 0 and step < tc.max_iter and not stop:
        _log_evaluation(writer, step, evaluate_fn(state, step))
      if stop:
        break
  finally:
    _close_run(preemption, data_iter, writer, ckpt)
  return state


def _training_input(config, source):
  """The iterator of this process's training batches: `source` (default `load_train_source(config)`), checked
  against the config first (`check_training_source`), through `pipeline.make_train_loader`, its keypoints in the
  model's coordinate convention (`examples.keypoint_coordinate_offset`)."""
  from mrcnn_jax.data import examples, pipeline

  tc = config.train
  source = source if source is not None else load_train_source(config)
  check_training_source(config, source)
  loader = pipeline.make_train_loader(source, config.input, global_batch_size=tc.batch_size, seed=tc.seed,
                                      num_workers=tc.num_workers,
                                      keypoint_offset=examples.keypoint_coordinate_offset(config),
                                      label_map=_training_label_map(config, source))
  return iter(loader)


def _restore_or_init(config, state: TrainState, replicated, ckpt, data_iter) -> TrainState:
  """The state the run starts from, on `replicated`: the newest checkpoint's (and `data_iter` moved to the position
  saved with it), else the fresh `state`, with config.init_from's weights merged in when that is set."""
  restored = ckpt.restore(target_state=state)
  if restored is not None:
    state, data_state, step = restored
    if data_state is not None:
      data_iter.set_state(data_state)
    log.info("resumed from %s at step %d", ckpt.directory, step)
    if config.init_from:
      log.info("init_from=%s ignored: the run resumes from its own checkpoint", config.init_from)
  elif config.init_from:
    # A fresh run only: the optimizer state stays the fresh one (no momentum), as it does for any fine-tuning.
    state = jax.device_put(init_from_pretrained(state, config.init_from), replicated)
  return state


def _last_good(ckpt) -> str:
  """Where an error message sends the user: the last checkpoint saved, which the error leaves intact."""
  last = ckpt.latest_step()
  return (f"the last good checkpoint is step {last} in {ckpt.directory} (left intact)" if last is not None
          else f"no checkpoint was saved yet in {ckpt.directory}")


def _log_step(writer, step: int, max_iter: int, metrics: dict, seconds: float, data_seconds: float) -> None:
  """The console line and the metrics of `step` (`writer` None on processes other than 0, which log nothing).
  seconds: the mean time per step of this run so far; data_seconds: this step's wait for its batch."""
  from mrcnn_jax import train_log

  values = {k: float(v) for k, v in metrics.items() if k != "finite"}
  if writer is not None:
    log.info(train_log.format_line(step, max_iter, values, seconds_per_iter=seconds, data_seconds=data_seconds))
    writer.write(step, dict(values, time=seconds, data_time=data_seconds))


def _count_nonfinite(metrics: dict, step: int, in_a_row: int, tc, ckpt) -> int:
  """The number of non-finite steps in a row after `step` (0 when its loss is finite). Raises FloatingPointError
  naming the step, its losses and the last good checkpoint when the run must stop: at the first non-finite step
  without train.skip_nonfinite, at train.max_consecutive_nonfinite in a row with it."""
  if bool(metrics["finite"]):
    return 0
  in_a_row += 1
  losses = {k: float(v) for k, v in metrics.items() if k.startswith("loss") or k == "total_loss"}
  if not tc.skip_nonfinite:
    raise FloatingPointError(f"non-finite loss at step {step}: {losses}; {_last_good(ckpt)}")
  if in_a_row >= tc.max_consecutive_nonfinite:
    raise FloatingPointError(
        f"{in_a_row} non-finite steps in a row, the last at step {step} (train.skip_nonfinite skips "
        f"at most train.max_consecutive_nonfinite = {tc.max_consecutive_nonfinite}): the run diverged; "
        f"losses {losses}; {_last_good(ckpt)}")
  log.warning("step %d: non-finite loss %s, update skipped (%d in a row, the run stops at %d)", step, losses,
              in_a_row, tc.max_consecutive_nonfinite)
  return in_a_row


def _save_checkpoint(ckpt, step: int, state: TrainState, data_iter, config) -> None:
  """Save `step` (forced: the caller decides when), with the input's position and the config; FloatingPointError
  instead when the parameters are not finite."""
  # A finite loss does not make a finite update (a huge learning rate overflows the parameters): a checkpoint
  # of such parameters would be the "last good" one a resumed run starts from.
  if not bool(_all_finite((state.params, state.batch_stats))):
    raise FloatingPointError(f"the parameters are not finite after step {step} (an update overflowed them: "
                             f"lower train.base_lr, or set train.clip_grad_norm); not saved: {_last_good(ckpt)}")
  ckpt.save(step, state, data_state=data_iter.get_state(), config=config, force=True)


def _training_label_map(config, source):
  """None when the model's labels are the source's contiguous 1..K; for a model in COCO's category-id label space
  (model.label_space "coco_ids", torchvision's 91 slots) the map from each contiguous label to its category id."""
  category_map = getattr(source, "category_map", None)
  if config.model.label_space != "coco_ids" or category_map is None:
    return None
  return category_map.label_to_category_id


def _close_run(preemption, data_iter, writer, ckpt) -> None:
  """However the run ends: the previous SIGTERM handler back, the loader's workers stopped, the logs closed, and the
  last asynchronous save written."""
  preemption.uninstall()
  _close_loader_iterator(data_iter)
  if writer is not None:
    writer.close()
  ckpt.wait()
  ckpt.close()


def _log_evaluation(writer, step: int, eval_metrics: dict) -> None:
  """The finite float metrics of an evaluation at `step`, beside the losses (process 0 only)."""
  if writer is not None and eval_metrics:
    writer.write(step, {k: v for k, v in eval_metrics.items() if isinstance(v, float) and math.isfinite(v)})
