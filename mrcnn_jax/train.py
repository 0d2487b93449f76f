"""The trainer's pieces: train state, optimizer and schedule, one jitted train step over a device mesh.

Small top-level functions that a notebook can import (flax examples/imagenet style):

  config --make_optimizer--> optax SGD: momentum, weight decay by parameter kind, frozen backbone stages untouched
  config, key --create_train_state--> TrainState(step, params, batch_stats, opt_state)
  state, DIR --init_from_pretrained--> the state with pretrained weights wherever path and shape match
    (`merge_pretrained`: the pure merge, and a report of what was not loaded)
  devices --make_mesh--> a 1-D data-parallel Mesh
  config, model, mesh --jit_train_step--> step(state, global batch) -> (state, metrics), state donated

Data parallel: the batch is sharded over the mesh's data axis (`data.pipeline.to_global_batch`), the state is
replicated, and XLA inserts the gradient all-reduce; no pmap, no hand-written collectives. Each step's sampling key
is folded from (train.seed, step), so a run is reproducible and a resumed run draws the same samples.

The loop around the step (data, logging, checkpoints, stopping on a non-finite loss) belongs to the entry point.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import pathlib
import re
import warnings
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mrcnn_jax.mesh import make_mesh  # also train.make_mesh, for the step's callers
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

log = logging.getLogger(__name__)

# Parameter kinds of `param_labels`: each gets its own weight decay, frozen ones no update at all.
FROZEN, KERNEL, BIAS, NORM = "frozen", "kernel", "bias", "norm"

# Backbone module names and the Detectron2 stage they belong to (freeze_at k freezes stages 1..k, 1 = stem).
_STAGE = re.compile(r"^(?:stem_|res(\d+)_)")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree, replicated over the mesh.

  step: () int32, steps taken (the iteration, skipped updates included); the sampling key is folded from it.
  params: the model's `params` collection (float32).
  batch_stats: the `batch_stats` collection (FrozenBN constants; BatchNorm running statistics when
    model.backbone.norm is "BN"). The optimizer never touches it.
  opt_state: the state of `make_optimizer(config)`.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# --------------------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule.
# --------------------------------------------------------------------------------------------------------------------


def learning_rate_schedule(config):
  """Detectron2's WarmupMultiStepLR as a function of the update count: int () -> float32 ().

  lr(it) = base_lr * warmup(it) * gamma ** (number of train.steps <= it), warmup(it) rising linearly from
  warmup_factor at it = 0 to 1 at it = warmup_iters (and 1 after). base_lr is used as given: it is the rate for
  the config's train.batch_size (Detectron2's 0.02 is for 16 images; a config that changes the batch size rescales
  base_lr itself, as `runlocal` does).
  """
  t = config.train
  base_lr, gamma = float(t.base_lr), float(t.gamma)
  warmup_iters, warmup_factor = int(t.warmup_iters), float(t.warmup_factor)
  steps = tuple(int(s) for s in t.steps)
  if list(steps) != sorted(steps):
    raise ValueError(f"train.steps must be increasing, got {steps}")
  boundaries = np.asarray(steps, np.int32).reshape(-1)

  def schedule(count):
    count = jnp.asarray(count)
    decays = jnp.sum(count >= boundaries)
    lr = base_lr * jnp.power(jnp.float32(gamma), decays)
    if warmup_iters > 0:
      alpha = jnp.minimum(count.astype(jnp.float32) / warmup_iters, 1.0)
      lr = lr * (warmup_factor * (1.0 - alpha) + alpha)
    return jnp.asarray(lr, jnp.float32)

  return schedule


def _frozen_stage(name: str) -> int | None:
  """The Detectron2 stage of a backbone module name (stem_conv -> 1, res3_0 -> 3), None for others."""
  m = _STAGE.match(name)
  if m is None:
    return None
  return 1 if m.group(1) is None else int(m.group(1))


def param_labels(params, freeze_at: int):
  """The kind of each parameter, by its path: a tree like `params` of FROZEN, KERNEL, BIAS or NORM.

  FROZEN: under backbone/stem_* (freeze_at >= 1) or backbone/res{k}_* with k <= freeze_at.
  NORM: under a module whose name contains "norm" (stem_norm, norm1, shortcut_norm: BatchNorm or GroupNorm scales
    and offsets), or named "scale".
  BIAS: other "bias" leaves (convolutions and dense layers). KERNEL: "kernel" leaves.
  Any other leaf raises ValueError naming its path, so that a new kind of parameter gets a decision.
  """
  def label(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if len(names) >= 2 and names[0] == "backbone":
      stage = _frozen_stage(names[1])
      if stage is not None and stage <= freeze_at:
        return FROZEN
    if names[-1] == "scale" or any("norm" in n for n in names[:-1]):
      return NORM
    if names[-1] == "bias":
      return BIAS
    if names[-1] == "kernel":
      return KERNEL
    raise ValueError(f"parameter {'/'.join(names)} is neither a kernel, a bias nor a norm parameter; "
                     f"give it a kind in mrcnn_jax.train.param_labels")

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (torch.optim.SGD, as Detectron2 trains), by parameter kind.

  Per step, with g the gradient: g clipped to global norm train.clip_grad_norm (None: not clipped), then
  d = g + wd * p with wd = train.weight_decay for kernels, train.weight_decay_bias for biases,
  train.weight_decay_norm for norm scales and offsets; buf = momentum * buf + d; p -= lr * buf, lr from
  `learning_rate_schedule` at the count of updates applied. Frozen backbone stages (model.backbone.freeze_at, see
  `param_labels`) get an update of exactly zero and keep no momentum. `batch_stats` are not parameters and never
  reach the optimizer.

  The state holds a single `count` (the schedule's), which `train_step` reads for the lr it logs.
  """
  t = config.train

  def decayed_momentum(rate):
    decay = optax.add_decayed_weights(float(rate)) if rate else optax.identity()
    return optax.chain(decay, optax.trace(decay=float(t.momentum)))

  transforms = {
      KERNEL: decayed_momentum(t.weight_decay),
      BIAS: decayed_momentum(t.weight_decay_bias),
      NORM: decayed_momentum(t.weight_decay_norm),
      FROZEN: optax.set_to_zero(),
  }
  clip = optax.identity() if t.clip_grad_norm is None else optax.clip_by_global_norm(float(t.clip_grad_norm))
  return optax.chain(
      clip,  # on the raw gradients, before weight decay (Detectron2 clips param.grad before optimizer.step)
      optax.multi_transform(transforms, functools.partial(param_labels, freeze_at=config.model.backbone.freeze_at)),
      optax.scale_by_learning_rate(learning_rate_schedule(config)),
  )


# --------------------------------------------------------------------------------------------------------------------
# Train state.
# --------------------------------------------------------------------------------------------------------------------


def create_train_state(config, key, canvas_hw=(128, 128)) -> TrainState:
  """A freshly initialized TrainState at step 0 (variables from `mask_rcnn.init_variables`).

  key: a jax.random key. canvas_hw: the image size traced for initialization; parameter shapes do not depend on
  it, so the default small canvas saves time. The arrays live on the default device: put them on the mesh with
  `jax.device_put(state, NamedSharding(mesh, P()))` before the first step.
  """
  variables = mask_rcnn.init_variables(config, key, canvas_hw)
  params = variables["params"]
  opt_state = jax.jit(make_optimizer(config).init)(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=opt_state)


# --------------------------------------------------------------------------------------------------------------------
# Fine-tuning: pretrained variables merged into a fresh initialization.
# --------------------------------------------------------------------------------------------------------------------


class MergeReport(NamedTuple):
  """What `merge_pretrained` took from the source; paths are "/"-joined ("params/box_head/cls_score/kernel").

  loaded: leaves taken from the source (same path and shape).
  shape_mismatch: (path, model shape, source shape) of leaves present in both with different shapes: kept as
    initialized (e.g. the class-dependent predictors when the number of classes changes).
  missing: leaves of the model absent from the source: kept as initialized (e.g. the heads, for a backbone-only
    checkpoint).
  unused: leaves of the source absent from the model (e.g. a keypoint head the model does not have).
  """

  loaded: tuple[str, ...]
  shape_mismatch: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
  missing: tuple[str, ...]
  unused: tuple[str, ...]


def _path_name(path) -> str:
  """A pytree key path as "params/box_head/cls_score/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _flatten(tree) -> dict[str, Any]:
  return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_pretrained(init_variables, loaded_variables) -> tuple[Any, MergeReport]:
  """Pretrained variables merged into freshly initialized ones, leaf by leaf (a pure function).

  Args:
    init_variables: the model's variables, {"params": ..., "batch_stats": ...} (`mask_rcnn.init_variables`).
    loaded_variables: the source's, in the same layout (`checkpoint.load_inference`), for another model possibly:
      another number of classes, no mask head, only a backbone.

  Returns:
    (variables, report): variables has the structure of `init_variables`; a leaf whose path and shape are also in
    the source is the source's array (numpy, cast to the initialized leaf's dtype), every other leaf is the
    initialized one, unchanged. The report lists which is which (`MergeReport`).
  """
  source = _flatten(loaded_variables)
  model_paths = set(_flatten(init_variables))
  loaded, mismatch, missing = [], [], []

  def take(path, init):
    name = _path_name(path)
    if name not in source:
      missing.append(name)
      return init
    src = source[name]
    if tuple(np.shape(src)) != tuple(np.shape(init)):
      mismatch.append((name, tuple(np.shape(init)), tuple(np.shape(src))))
      return init
    loaded.append(name)
    return np.asarray(src, dtype=init.dtype)

  variables = jax.tree_util.tree_map_with_path(take, init_variables)
  unused = sorted(set(source) - model_paths)
  return variables, MergeReport(tuple(loaded), tuple(mismatch), tuple(missing), tuple(unused))


def collapse_paths(paths, universe) -> list[str]:
  """`paths` ("/"-joined leaf paths, a subset of `universe`) for a log line: a subtree of `universe` with several
  leaves, all in `paths`, is named once as "prefix/* (N)", e.g. ["params/fpn/* (16)", "params/rpn/conv/bias"]."""
  def prefixes(path):
    parts = tuple(path.split("/"))
    return [parts[:i] for i in range(1, len(parts) + 1)]

  total, hit = collections.Counter(), collections.Counter()
  for path in universe:
    total.update(prefixes(path))
  for path in paths:
    hit.update(prefixes(path))
  out = []
  for path in sorted(paths):
    top = next(p for p in prefixes(path) if hit[p] == total[p])  # the widest subtree entirely in `paths`
    name = "/".join(top)
    entry = path if total[top] == 1 else f"{name}/* ({total[top]})"
    if entry not in out:
      out.append(entry)
  return out


def log_merge_report(report: MergeReport, source: str) -> None:
  """Logs what `merge_pretrained` did: a count at INFO; what was not loaded, and what went unused, at WARNING."""
  model_paths = list(report.loaded) + [m[0] for m in report.shape_mismatch] + list(report.missing)
  log.info("init_from %s: loaded %d of the model's %d variables", source, len(report.loaded), len(model_paths))
  if report.shape_mismatch:
    mismatches = ", ".join(f"{name} model {a} vs source {b}" for name, a, b in report.shape_mismatch)
    log.warning("init_from %s: %d variables not loaded, their shapes differ (kept as initialized): %s", source,
                len(report.shape_mismatch), mismatches)
  if report.missing:
    log.warning("init_from %s: %d variables not in the source (kept as initialized): %s", source,
                len(report.missing), ", ".join(collapse_paths(report.missing, model_paths)))
  if report.unused:
    source_paths = list(report.loaded) + [m[0] for m in report.shape_mismatch] + list(report.unused)
    log.warning("init_from %s: %d source variables unused (not in the model): %s", source, len(report.unused),
                ", ".join(collapse_paths(report.unused, source_paths)))


def init_from_pretrained(state: TrainState, directory) -> TrainState:
  """`state` with its params and batch_stats merged with the checkpoint in `directory` (`merge_pretrained`).

  directory: anything `checkpoint.load_inference` reads: a `save_variables` directory (converted torchvision or
  Detectron2 weights, an exported model), a training workdir, its checkpoints/ directory or one step of it. The
  step and the optimizer state stay as they are (a fresh state's: step 0, no momentum). Logs what was not loaded;
  raises ValueError when nothing matched (not a checkpoint of this kind of model).
  """
  from mrcnn_jax import checkpoint

  loaded, _ = checkpoint.load_inference(directory)
  init = {"params": state.params, "batch_stats": state.batch_stats}
  variables, report = merge_pretrained(init, loaded)
  log_merge_report(report, str(directory))
  if not report.loaded:
    raise ValueError(f"init_from={directory}: no variable of the checkpoint matches the model in path and "
                     "shape; is it a checkpoint of this library's Mask R-CNN (converted with "
                     "scripts/convert_weights.py)?")
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


# --------------------------------------------------------------------------------------------------------------------
# One step.
# --------------------------------------------------------------------------------------------------------------------


def train_step(state: TrainState, batch: dict, *, config, model: MaskRCNN) -> tuple[TrainState, dict]:
  """One SGD step on a batch: losses, gradients, update.

  state: TrainState. batch: the dict of `data.pipeline.train_example` arrays stacked to (B, ...) (image
  (B, H, W, 3) float32, image_info (B, 6), gt_boxes (B, G, 4), gt_classes (B, G), gt_valid (B, G),
  gt_is_crowd (B, G), gt_masks (B, G, M, M) uint8; other keys are ignored). model: MaskRCNN(config.model,
  train=True); its compute dtype comes from config.model.compute_dtype, params and losses stay float32.

  Returns the new state (step + 1) and metrics, all () arrays: the model's losses (loss_rpn_cls, loss_rpn_loc,
  loss_cls, loss_box_reg, loss_mask, total_loss), lr (the rate of this update), grad_norm (global L2 norm of the
  gradients before clipping), finite (bool: total loss and gradient norm finite) and nonfinite_skipped (int32, 1
  when this step's update was skipped). With train.skip_nonfinite a non-finite step leaves params, batch_stats and
  optimizer state (hence the schedule's count) as they were; without it the update is applied and the caller is
  expected to stop on `finite` False.
  """
  # The same (seed, step) draws the same anchors and RoIs, whatever the device count or a restart.
  key = jax.random.fold_in(jax.random.key(config.train.seed), state.step)
  update_stats = config.model.backbone.norm == "BN"  # BatchNorm's running statistics; FrozenBN's are constants

  def loss_fn(params):
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    if update_stats:
      losses, new_vars = model.apply(variables, batch, key, method=MaskRCNN.losses, mutable=["batch_stats"])
      batch_stats = new_vars["batch_stats"]
    else:
      losses = model.apply(variables, batch, key, method=MaskRCNN.losses)
      batch_stats = state.batch_stats
    losses = {k: v.astype(jnp.float32) for k, v in losses.items()}
    return losses["total_loss"], (losses, batch_stats)

  (total, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)  # the L2 norm of all leaves together (float32: params are)
  tx = make_optimizer(config)
  lr = learning_rate_schedule(config)(optax.tree_utils.tree_get(state.opt_state, "count"))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  skipped = jnp.zeros((), jnp.int32)
  if config.train.skip_nonfinite:
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_if_bad(params, state.params)
    opt_state = keep_if_bad(opt_state, state.opt_state)
    batch_stats = keep_if_bad(batch_stats, state.batch_stats)
    skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  metrics = dict(losses, lr=lr, grad_norm=grad_norm, finite=finite, nonfinite_skipped=skipped)
  return new_state, metrics


# --------------------------------------------------------------------------------------------------------------------
# The jitted step (over `mrcnn_jax.mesh.make_mesh`'s mesh).
# --------------------------------------------------------------------------------------------------------------------


def jit_train_step(config, model: MaskRCNN, mesh: Mesh, state_sharding=None, data_axis: str | None = None):
  """`train_step` jitted over `mesh`: step(state, batch) -> (state, metrics), the state's buffers donated.

  state_sharding: a sharding (or pytree of shardings) for the state; default replicated on every device.
  data_axis: the mesh axis the batch's leading dimension is sharded over; default the mesh's first axis.
  The batch must already be global arrays with that sharding (`data.pipeline.to_global_batch`), and the state on
  `state_sharding`; metrics come back replicated.
  """
  data_axis = mesh.axis_names[0] if data_axis is None else data_axis
  replicated = NamedSharding(mesh, P())
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(
      functools.partial(train_step, config=config, model=model),
      in_shardings=(state_sharding, NamedSharding(mesh, P(data_axis))),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
  )


# ----------------------------------------------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------------------------------------------


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
    (`pipeline.select_instances`: crowd ones and then the smallest go first).
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


def train(config, workdir, *, source=None, stop_after: int | None = None, evaluate_fn=None) -> TrainState:
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
  """
  import time

  from mrcnn_jax import train_checkpoint, train_log
  from mrcnn_jax.preemption import install_preemption_handler
  from mrcnn_jax.data import pipeline

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tc = config.train
  # --- mesh and data ---------------------------------------------------------------------------------------------
  mesh = make_mesh()
  if int(tc.get("max_consecutive_nonfinite") or 0) < 1:
    raise ValueError(f"train.max_consecutive_nonfinite must be >= 1, got {tc.get('max_consecutive_nonfinite')!r}")
  source = source if source is not None else load_train_source(config)
  check_training_source(config, source)
  loader = pipeline.make_train_loader(source, config.input, global_batch_size=tc.batch_size, seed=tc.seed,
                                      num_workers=tc.num_workers)
  data_iter = iter(loader)
  # --- model, optimizer, restore ---------------------------------------------------------------------------------
  model = mask_rcnn.build_model(config, train=True)
  state = create_train_state(config, jax.random.key(tc.seed))
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(state, replicated)
  ckpt = train_checkpoint.TrainCheckpointer(workdir, keep=tc.keep_checkpoints,
                                           save_interval_steps=tc.checkpoint_every)
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
  step = int(state.step)
  step_fn = jit_train_step(config, model, mesh)
  # --- loop ------------------------------------------------------------------------------------------------------
  # One set of writers for the whole run: process 0 logs (the metrics are replicated, every process holds the same
  # values): metrics.jsonl and TensorBoard events in <workdir>/tensorboard.
  writer = train_log.MetricWriters.for_workdir(workdir, start_step=step) if jax.process_index() == 0 else None
  preemption = install_preemption_handler()

  def last_good() -> str:
    last = ckpt.latest_step()
    return (f"the last good checkpoint is step {last} in {ckpt.directory} (left intact)" if last is not None
            else f"no checkpoint was saved yet in {ckpt.directory}")

  steps_done = 0
  nonfinite_in_a_row = 0
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
        values = {k: float(v) for k, v in metrics.items() if k != "finite"}
        seconds = (time.perf_counter() - start) / steps_done
        if writer is not None:
          log.info(train_log.format_line(step, tc.max_iter, values, seconds_per_iter=seconds,
                                         data_seconds=data_seconds))
          writer.write(step, dict(values, time=seconds, data_time=data_seconds))
      if bool(metrics["finite"]):
        nonfinite_in_a_row = 0
      else:
        nonfinite_in_a_row += 1
        losses = {k: float(v) for k, v in metrics.items() if k.startswith("loss") or k == "total_loss"}
        if not tc.skip_nonfinite:
          raise FloatingPointError(f"non-finite loss at step {step}: {losses}; {last_good()}")
        if nonfinite_in_a_row >= tc.max_consecutive_nonfinite:
          raise FloatingPointError(
              f"{nonfinite_in_a_row} non-finite steps in a row, the last at step {step} (train.skip_nonfinite skips "
              f"at most train.max_consecutive_nonfinite = {tc.max_consecutive_nonfinite}): the run diverged; "
              f"losses {losses}; {last_good()}")
        log.warning("step %d: non-finite loss %s, update skipped (%d in a row, the run stops at %d)", step, losses,
                    nonfinite_in_a_row, tc.max_consecutive_nonfinite)
      # A signal reaches one host; every process must stop (and save) at the same step: a collective check.
      stop = preemption.sync_requested() or (stop_after is not None and steps_done >= stop_after)
      if step % tc.checkpoint_every == 0 or step == tc.max_iter or stop:
        # A finite loss does not make a finite update (a huge learning rate overflows the parameters): a checkpoint
        # of such parameters would be the "last good" one a resumed run starts from.
        if not bool(_all_finite((state.params, state.batch_stats))):
          raise FloatingPointError(f"the parameters are not finite after step {step} (an update overflowed them: "
                                   f"lower train.base_lr, or set train.clip_grad_norm); not saved: {last_good()}")
        ckpt.save(step, state, data_state=data_iter.get_state(), config=config, force=True)
      if evaluate_fn is not None and tc.eval_every and step % tc.eval_every == 0 and step < tc.max_iter and not stop:
        eval_metrics = evaluate_fn(state, step)
        if writer is not None and eval_metrics:
          writer.write(step, {k: v for k, v in eval_metrics.items() if isinstance(v, float) and math.isfinite(v)})
      if stop:
        break
  finally:
    preemption.uninstall()
    _close_loader_iterator(data_iter)
    if writer is not None:
      writer.close()
    ckpt.wait()
    ckpt.close()
  return state
