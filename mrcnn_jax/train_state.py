"""The train state and the optimizer that updates it: what a step reads and writes, and how a run starts.

Small top-level functions that a notebook can import (flax examples/imagenet style):

  config --make_optimizer--> optax SGD: momentum, weight decay by parameter kind, frozen backbone stages untouched
  config, key --create_train_state--> TrainState(step, params, batch_stats, opt_state)
  state, DIR --init_from_pretrained--> the state with pretrained weights wherever path and shape match
    (`merge_pretrained`: the pure merge, and a report of what was not loaded)

The step that applies the optimizer is `mrcnn_jax.train_step`; the loop around it, `mrcnn_jax.train`.
"""

from __future__ import annotations

import collections
import functools
import logging
import re
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mrcnn_jax.modeling import mask_rcnn

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
                     f"give it a kind in mrcnn_jax.train_state.param_labels")

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (torch.optim.SGD, as Detectron2 trains), by parameter kind.

  Per step, with g the gradient: g clipped to global norm train.clip_grad_norm (None: not clipped), then
  d = g + wd * p with wd = train.weight_decay for kernels, train.weight_decay_bias for biases,
  train.weight_decay_norm for norm scales and offsets; buf = momentum * buf + d; p -= lr * buf, lr from
  `learning_rate_schedule` at the count of updates applied. Frozen backbone stages (model.backbone.freeze_at, see
  `param_labels`) get an update of exactly zero and keep no momentum. `batch_stats` are not parameters and never
  reach the optimizer.

  The state holds a single `count` (the schedule's), which `train_step.train_step` reads for the lr it logs.
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
  return state_from_variables(config, mask_rcnn.init_variables(config, key, canvas_hw))


def state_from_variables(config, variables) -> TrainState:
  """A TrainState at step 0 holding `variables` ({"params": ..., "batch_stats": ...}) and the optimizer's fresh
  state."""
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
