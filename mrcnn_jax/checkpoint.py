"""Checkpoints on disk: the one module that talks to orbax.

A variables checkpoint (converted weights, or a model exported for inference and fine-tuning) is a directory:

  DIR/variables/      {"params": ..., "batch_stats": ...} as an orbax StandardCheckpointer checkpoint
  DIR/config.json     the ml_collections config the variables belong to (optional)
  DIR/metadata.json   where the variables came from, e.g. {"source": "torchvision", "file": ..., "format_version": 1}

Saving is atomic at the level of DIR: everything is written into a hidden temporary sibling (`.DIR.tmp-*`) that is
renamed to DIR at the end, so an interrupted save never leaves a half-written checkpoint at DIR (only, after a kill
-9, a hidden temporary sibling that can be deleted). Overwriting renames the old DIR away first, renames the new one
in, then deletes the old one; a failure in between puts the old one back.

Loading needs no model and no target tree: the tree is restored as stored, every leaf a host numpy array, whatever
the number of devices it was saved with (orbax's sharding metadata is deliberately not used to place the arrays).

orbax API: `orbax.checkpoint.StandardCheckpointer` (save / wait_until_finished / metadata / restore with a tree of
`jax.ShapeDtypeStruct`), present from orbax 0.5 through the current 0.12 releases (this module is tested with 0.11.40
and 0.12.8, and each reads the other's checkpoints).

A train-state checkpoint (the trainer's, for exact resume) is one orbax CheckpointManager step directory:

  WORKDIR/checkpoints/<step>/state/        the train-state pytree (params, batch_stats, opt_state, step, ...)
  WORKDIR/checkpoints/<step>/data_state/   JSON: every process's data iterator state (grain's bytes, base64)
  WORKDIR/checkpoints/<step>/config/       JSON: the run's config

`TrainCheckpointer` wraps the manager: saves are asynchronous, the last `keep` steps are kept, and orbax writes each
step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once every item is written
(AtomicRenameTemporaryPath), so a save killed at any point leaves the previous steps as they were and no visible
partial step. `install_preemption_handler` turns SIGTERM into a flag that the trainer polls between steps.

Inference and evaluation take either kind: `load_inference(path)` accepts a variables checkpoint, a training
workdir, its checkpoints/ directory or one step directory, and returns the variables and the saved config.

orbax API: `CheckpointManager` with `item_handlers` (StandardCheckpointHandler, JsonCheckpointHandler),
`args.Composite` of `StandardSave`/`StandardRestore` and `JsonSave`/`JsonRestore`, `item_metadata`, and the
`checkpoint_managers` policies (`LatestN`, `FixedIntervalPolicy`; releases without them get `max_to_keep` and
`save_interval_steps`). Tested with 0.12.8.
"""

from __future__ import annotations

import base64
import json
import logging
import pathlib
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mrcnn_jax import atomic

FORMAT_VERSION = 1
VARIABLES_DIR = "variables"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data_state", "config"

log = logging.getLogger(__name__)


def _is_nonempty_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any(path.iterdir())


def _config_json(config) -> str:
  """A ConfigDict (or a plain mapping) as JSON text; values JSON cannot hold are written as their best effort."""
  if hasattr(config, "to_json_best_effort"):
    return config.to_json_best_effort(indent=2)
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.dumps(config, indent=2, default=repr)


def _to_host(variables: Mapping[str, Any]) -> dict:
  """Every leaf as a numpy array. Saving numpy (not jax.Array) leaves no device sharding in the checkpoint, so a
  process with any number of devices restores it; device_get gathers a sharded array's shards on this host."""
  def leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      raise ValueError("save_variables needs arrays whose shards are all on this host; multi-host train state goes "
                       "through the trainer's checkpoint manager")
    return np.asarray(jax.device_get(x))
  return jax.tree.map(leaf, dict(variables))


def save_variables(directory, variables: Mapping[str, Any], *, config=None, metadata: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> pathlib.Path:
  """Save variables (and their config and metadata) atomically to `directory`.

  Args:
    directory: the checkpoint directory to create. It must not exist, or be empty, unless `overwrite`.
    variables: nested dict of arrays, {"params": ..., "batch_stats": ...} (numpy or jax arrays; written as numpy,
      dtypes kept).
    config: an ml_collections.ConfigDict (or a plain dict) written to config.json, or None.
    metadata: JSON-serializable provenance written to metadata.json, with "format_version" added.
    overwrite: replace an existing non-empty `directory` (still atomically).

  Returns:
    The absolute path of the written checkpoint directory.
  """
  directory = pathlib.Path(directory).expanduser().absolute()
  if jax.process_count() > 1:
    raise NotImplementedError(f"save_variables({directory}) writes from a single process; in a multi-process run, "
                              "save with the trainer's checkpoint manager")
  if _is_nonempty_dir(directory) and not overwrite:
    raise FileExistsError(f"checkpoint directory {directory} exists and is not empty; pass overwrite=True to replace "
                          "it")
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{directory} exists and is not a directory")
  host_variables = _to_host(variables)
  meta = {"format_version": FORMAT_VERSION, **(dict(metadata) if metadata else {})}
  meta_text = json.dumps(meta, indent=2, default=str)  # fail on bad metadata before any file is written
  config_text = None if config is None else _config_json(config)

  import orbax.checkpoint as ocp  # here, not at the top: importing the package should not pull in orbax

  def write(tmp: pathlib.Path) -> None:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / VARIABLES_DIR, host_variables)
      ckptr.wait_until_finished()  # the save is asynchronous; the rename into place must see it complete
    if config_text is not None:
      (tmp / CONFIG_FILE).write_text(config_text + "\n")
    (tmp / METADATA_FILE).write_text(meta_text + "\n")

  atomic.write_dir(directory, write)  # an existing directory is empty here, or to be overwritten
  return directory


def _require_checkpoint(directory) -> pathlib.Path:
  directory = pathlib.Path(directory).expanduser().absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  if not (directory / VARIABLES_DIR).is_dir():
    raise FileNotFoundError(f"{directory} holds no variables checkpoint (expected {directory / VARIABLES_DIR}, "
                            "written by mrcnn_jax.checkpoint.save_variables or scripts/convert_weights.py)")
  return directory


def _abstract_tree(step_metadata):
  """The saved tree with each array as a jax.ShapeDtypeStruct without sharding, i.e. "restore as host numpy".

  orbax 0.11+ returns StepMetadata (item_metadata) holding a TreeMetadata (tree); earlier releases the tree itself.
  """
  tree = getattr(step_metadata, "item_metadata", step_metadata)
  tree = getattr(tree, "tree", tree)

  def leaf(m):
    if not (hasattr(m, "shape") and hasattr(m, "dtype")):
      raise ValueError(f"unexpected non-array entry in a variables checkpoint: {m!r}")
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
  return jax.tree.map(leaf, tree)


def load_variables(directory) -> dict:
  """Restore the variables of a checkpoint written by `save_variables`, without the model.

  Returns:
    The saved nested dict ({"params": ..., "batch_stats": ...}), every leaf a numpy array with its saved dtype.
  """
  directory = _require_checkpoint(directory)
  import orbax.checkpoint as ocp

  path = directory / VARIABLES_DIR
  with ocp.StandardCheckpointer() as ckptr:
    try:
      target = _abstract_tree(ckptr.metadata(path))
    except FileNotFoundError:
      target = None
    if target is None:  # orbax logs a warning and gives no tree when its metadata files are missing
      raise FileNotFoundError(f"{directory} holds no readable orbax checkpoint in {path} (an interrupted or foreign "
                              "write?)")
    # An explicit target without sharding: restoring "as saved" would rebuild the saving run's device mesh.
    restored = ckptr.restore(path, target)
  return jax.tree.map(np.asarray, restored)


def load_config_json(directory) -> dict | None:
  """The config saved beside the variables, as a plain dict (ml_collections.ConfigDict(d) rebuilds it), or None."""
  directory = _require_checkpoint(directory)
  path = directory / CONFIG_FILE
  return json.loads(path.read_text()) if path.exists() else None


def load_metadata_json(directory) -> dict:
  """The provenance saved beside the variables ({"format_version": 1, "source": ..., ...})."""
  directory = _require_checkpoint(directory)
  path = directory / METADATA_FILE
  return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------------------------------------------------
# Train-state checkpoints: orbax CheckpointManager, async, keep-N, atomic, resumable on any device count.
# ----------------------------------------------------------------------------------------------------------------

DATA_FORMAT_VERSION = 1


def _gather_bytes(data_state: bytes | None) -> list[bytes | None]:
  """Every process's `data_state`, in process order (each host reads its own data shard, so each has its own
  iterator state, while orbax writes JSON items from the primary process only). A collective in multi-process runs:
  every process must call it."""
  if jax.process_count() == 1:
    return [data_state]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(data_state or b"", np.uint8)
  # -1 marks "no state", which differs from an empty state b"".
  sizes = multihost_utils.process_allgather(np.array([-1 if data_state is None else raw.size], np.int32))
  sizes = np.asarray(sizes).reshape(-1)
  padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
  padded[:raw.size] = raw
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  return [None if n < 0 else everyone[i, :n].tobytes() for i, n in enumerate(sizes)]


def _encode_data_states(states: list[bytes | None]) -> dict:
  return {"format_version": DATA_FORMAT_VERSION, "process_count": len(states),
          "data_states_base64": [None if s is None else base64.b64encode(s).decode("ascii") for s in states]}


def _decode_data_state(item: Mapping[str, Any] | None, step: int) -> bytes | None:
  """This process's data iterator state from the saved JSON item, or None (with a warning when the process count
  changed: a grain state belongs to one data shard, so the input restarts from its beginning instead)."""
  if not item:
    return None
  states = item.get("data_states_base64") or []
  if len(states) != jax.process_count():
    log.warning("checkpoint step %d holds the data iterator states of %d processes, this run has %d: the data "
                "iterators start afresh", step, len(states), jax.process_count())
    return None
  mine = states[jax.process_index()]
  return None if mine is None else base64.b64decode(mine)


def _host_target(state_metadata) -> Any:
  """A restore target for the saved state tree placing every array on this process's first device.

  Leaving the sharding out would make orbax rebuild the saving run's sharding from its metadata, which fails with
  another device count (8 CPU devices saved, 1 restoring); one local device always exists.
  """
  tree = getattr(state_metadata, "tree", state_metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(m):
    if not (hasattr(m, "shape") and hasattr(m, "dtype")):
      raise ValueError(f"unexpected non-array entry in a train-state checkpoint: {m!r}")
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
  return jax.tree.map(leaf, tree)


def _with_default_shardings(target_state) -> Any:
  """`target_state` with this process's first device as the sharding of abstract leaves that have none (as
  `jax.eval_shape` gives when its inputs carry no sharding): orbax would otherwise fall back to the saved sharding,
  which only exists on the saving run's topology."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
    return x
  return jax.tree.map(leaf, target_state)


class TrainCheckpointer:
  """The trainer's checkpoints in `<workdir>/checkpoints`: state pytree, data iterator state and config per step.

  Typical use:

    ckpt = TrainCheckpointer(workdir, keep=3, save_interval_steps=1000)
    restored = ckpt.restore(target_state=jax.eval_shape(create_state))  # abstract tree with shardings
    if restored is not None:
      state, data_state, step = restored
    ...
    ckpt.save(step, state, data_state=it.get_state(), config=config)  # returns once the arrays are on the host
    ...
    ckpt.close()  # waits for the last asynchronous save

  Every process of a multi-process run must make the same calls (orbax synchronizes them).
  """

  def __init__(self, workdir, *, keep: int = 3, save_interval_steps: int = 1, async_save: bool = True,
               read_only: bool = False):
    """
    Args:
      workdir: the run's directory; checkpoints go to `<workdir>/checkpoints` (created unless read_only).
      keep: how many of the latest steps to keep; older ones are deleted after each save.
      save_interval_steps: `save` writes only steps that are multiples of it (unless forced).
      async_save: write in a background thread; `save` returns once the arrays are copied off the devices, so the
        caller may donate or overwrite them right away.
      read_only: open the checkpoints of another, maybe running, job: never write, and leave its temporary
        directories alone (a writer deletes the leftover `*.orbax-checkpoint-tmp` directories of killed saves).
    """
    import orbax.checkpoint as ocp

    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = pathlib.Path(workdir).expanduser().absolute() / CHECKPOINTS_DIR
    self.read_only = read_only
    options = {"enable_async_checkpointing": async_save, "create": not read_only, "read_only": read_only,
               "cleanup_tmp_directories": not read_only}
    policies = getattr(ocp, "checkpoint_managers", None)
    if hasattr(policies, "LatestN"):  # max_to_keep is deprecated in favour of preservation policies
      options["preservation_policy"] = policies.LatestN(n=keep)
      # Orbax's default policy also saves the first step offered when none exists; steps that are multiples of
      # the interval are easier to reason about (and orbax's own preemption sync point still triggers a save).
      options["save_decision_policy"] = policies.AnySavePolicy([
          policies.FixedIntervalPolicy(save_interval_steps), policies.PreemptionCheckpointingPolicy()])
    else:
      options.update(max_to_keep=keep, save_interval_steps=save_interval_steps)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(**options),
        # Handlers named up front, so that item_metadata and restore work in a fresh process before any save.
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: ocp.JsonCheckpointHandler(),
                       CONFIG_ITEM: ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, *, data_state: bytes | None = None, config=None, force: bool = False) -> bool:
    """Start saving `state` (any pytree of arrays), the data iterator state and the config as step `step`.

    Args:
      step: the train step the state belongs to (the number of updates applied).
      state: pytree of jax or numpy arrays (params, batch_stats, opt_state, step, ...).
      data_state: this process's data iterator state (grain's `get_state()` bytes), or None.
      config: an ml_collections.ConfigDict or a plain mapping (written as JSON), or None.
      force: save even if `step` is not a multiple of `save_interval_steps` (at preemption or at the end).

    Returns:
      True if a save was started; False if the interval skips `step` or `step` is already saved.
    """
    import orbax.checkpoint as ocp

    if self.read_only:  # orbax's own check is skipped by the forced save below
      raise ValueError(f"save({step}) on a read-only TrainCheckpointer of {self.directory}")
    step = int(step)
    # Checked before the collective below, with the same answer on every process. An existing step is not an error:
    # a preemption may arrive right after the periodic save of the same step.
    if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
      return False
    data_item = _encode_data_states(_gather_bytes(data_state))
    config_item = None if config is None else json.loads(_config_json(config))
    return self._manager.save(step, force=True, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: ocp.args.JsonSave(data_item),
        CONFIG_ITEM: ocp.args.JsonSave(config_item),
    }))

  def restore(self, step: int | None = None, *, target_state=None):
    """The checkpoint of `step` (default: the latest), or None when there is none (a fresh run).

    Args:
      step: a saved step, or None for the latest.
      target_state: a pytree like the saved state whose leaves are jax.ShapeDtypeStruct (e.g. `jax.eval_shape` of
        the state initializer, with shardings) or arrays: the state is restored with its structure (flax struct
        dataclasses, optax NamedTuples), dtypes and shardings, onto however many devices this run has (abstract
        leaves without a sharding land on this process's first device). Without it, the state comes back as saved
        (dicts and lists in place of custom nodes), every leaf a host numpy array.

    Returns:
      (state, data_state, step): data_state is this process's saved iterator state (bytes) or None.
    """
    import orbax.checkpoint as ocp

    self.wait()  # a step still being written is not readable yet
    if step is None:
      step = self.latest_step()
      if step is None:
        return None
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (steps: {self.all_steps()})")
    step = int(step)
    if target_state is None:
      target = _host_target(self._manager.item_metadata(step)[STATE_ITEM])
    else:
      target = _with_default_shardings(target_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(target), DATA_ITEM: ocp.args.JsonRestore()}))
    state = restored[STATE_ITEM]
    if target_state is None:
      state = jax.tree.map(np.asarray, state)
    return state, _decode_data_state(restored[DATA_ITEM], step), step

  def restore_config(self, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: the latest) as a plain dict, or None if none was saved."""
    import orbax.checkpoint as ocp

    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]

  def latest_step(self) -> int | None:
    """The latest saved step (including one whose asynchronous save is still running), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The saved steps, oldest first."""
    return sorted(self._manager.all_steps())

  def wait(self) -> None:
    """Block until the asynchronous save in flight (if any) is written and renamed into place."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Wait for pending saves and deletions, then release orbax's threads."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------------------------------------------
# Inference and evaluation: variables and config from whichever kind of checkpoint directory a user names.
# ----------------------------------------------------------------------------------------------------------------

_INFERENCE_LAYOUTS = (f"a variables checkpoint (DIR/{VARIABLES_DIR}/, written by save_variables or "
                      f"scripts/convert_weights.py), a training workdir (DIR/{CHECKPOINTS_DIR}/<step>/), its "
                      f"{CHECKPOINTS_DIR}/ directory, or one step directory {CHECKPOINTS_DIR}/<step>/ (holding "
                      f"{STATE_ITEM}/)")


def load_inference(path) -> tuple[dict, dict | None]:
  """The variables and config to run a model, from any checkpoint directory a user is likely to name.

  Args:
    path: one of
      * a variables checkpoint (`save_variables`: converted weights, an exported model): PATH/variables/;
      * a training workdir: PATH/checkpoints/<step>/ (the latest finished step is loaded);
      * that checkpoints/ directory itself (the latest finished step);
      * one step directory .../checkpoints/<step>/ (that step).

  Returns:
    (variables, config): variables {"params": ..., "batch_stats": ...}, every leaf a host numpy array with its saved
    dtype (batch_stats {} when the checkpoint has none; a train state's step and optimizer state are left out);
    config the saved config as a plain dict (`inference_config` rebuilds a ConfigDict from it, or checks a given
    config against it), or None when none was saved.

  Raises:
    FileNotFoundError naming `path` and the layouts expected, when it is none of these, or a training directory
    without a finished step.
  """
  kind, directory, step = _locate(path)
  if kind == VARIABLES_DIR:
    return load_variables(directory), load_config_json(directory)
  # Read-only: the run may still be training (and writing) in this workdir.
  with TrainCheckpointer(directory, read_only=True) as ckpt:
    restored = ckpt.restore(step)
    if restored is None:
      raise FileNotFoundError(_no_finished_step(directory))
    state, _, step = restored
    config = ckpt.restore_config(step)
  # Restored without a target, the TrainState comes back as a dict of its fields.
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
  return variables, config


def load_saved_config(path) -> dict | None:
  """The config saved with the checkpoint `load_inference(path)` would load, without reading its arrays (so that
  a command can check its inputs against it before a large checkpoint loads); None when none was saved."""
  kind, directory, step = _locate(path)
  if kind == VARIABLES_DIR:
    return load_config_json(directory)
  with TrainCheckpointer(directory, read_only=True) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(_no_finished_step(directory))
    return ckpt.restore_config(step)


def _locate(path) -> tuple[str, pathlib.Path, int | None]:
  """(VARIABLES_DIR, the checkpoint directory, None) or (CHECKPOINTS_DIR, the training workdir, the step named or
  None for the latest) for a path `load_inference` takes; FileNotFoundError naming it otherwise."""
  directory = pathlib.Path(path).expanduser().absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint directory {directory}; expected {_INFERENCE_LAYOUTS}")
  if (directory / VARIABLES_DIR).is_dir():
    return VARIABLES_DIR, directory, None
  if directory.name.isdigit() and (directory / STATE_ITEM).is_dir() and directory.parent.name == CHECKPOINTS_DIR:
    return CHECKPOINTS_DIR, directory.parent.parent, int(directory.name)
  if directory.name == CHECKPOINTS_DIR:
    return CHECKPOINTS_DIR, directory.parent, None
  if (directory / CHECKPOINTS_DIR).is_dir():
    return CHECKPOINTS_DIR, directory, None
  raise FileNotFoundError(f"{directory} is not a checkpoint directory; expected {_INFERENCE_LAYOUTS}")


def _no_finished_step(workdir: pathlib.Path) -> str:
  return (f"{workdir / CHECKPOINTS_DIR} holds no finished training step (a run that has not saved yet?); expected "
          f"{_INFERENCE_LAYOUTS}")


# ----------------------------------------------------------------------------------------------------------------
# The config a checkpoint runs with: the one saved beside it, or a given one that agrees with it.
# ----------------------------------------------------------------------------------------------------------------

# Model fields that do not shape the variables and name what the checkpoint was trained on: taken from the
# checkpoint, never a reason to refuse a given config (see `inference_config`).
_FROM_CHECKPOINT = ("model.class_names",)


def config_from_saved(saved: Mapping[str, Any]):
  """A locked ConfigDict from a config saved as JSON (`load_inference`), its lists turned back into the tuples the
  config files use."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  def tuples(value):
    if isinstance(value, Mapping):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value

  config = ml_collections.ConfigDict(tuples(dict(saved)))
  config.lock()
  return config


def _flat(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def model_differences(config, saved: Mapping[str, Any] | None) -> list[tuple[str, Any, Any]]:
  """(field, value saved with the checkpoint, value in `config`) of every model field set in both that differs,
  compared as JSON (tuples as lists), sorted by field."""
  if not saved or not isinstance(saved.get("model"), Mapping):
    return []
  given = _flat(json.loads(config.model.to_json_best_effort()), "model.")
  stored = _flat(saved["model"], "model.")
  return [(k, stored[k], given[k]) for k in sorted(given.keys() & stored.keys()) if given[k] != stored[k]]


def inference_config(saved: Mapping[str, Any] | None, config=None, *, explicit=(), where: str = "the checkpoint",
                     given: str = "the given config"):
  """The config to run a checkpoint's model with, from the config saved with it (`load_inference`) and the one a
  user gives.

  Args:
    saved: the checkpoint's config as a plain dict, or None when it has none.
    config: a ConfigDict, or None to use the saved one (`config_from_saved`).
    explicit: the model fields the user set on purpose ("model.roi_heads.score_thresh_test", e.g. a command line's
      --config.model.* overrides): their values stand even where the checkpoint's differ.
    where, given: how messages name the checkpoint and the config.

  Returns:
    The saved config (config None), else a copy of `config` with the checkpoint's model.class_names (unless
    explicit): the names of what it was trained on, which a config file for another dataset does not know.

  Raises:
    ValueError when neither config exists, or naming the model fields (other than class names and `explicit`
    ones) whose values in `config` differ from the checkpoint's: a model other than the one the variables belong to
    fails later with a parameter-shape error, or silently computes something else.
  """
  import copy  # pylint: disable=import-outside-toplevel

  if config is None:
    if saved is None:
      raise ValueError(f"{where} carries no config: pass --config=configs/FILE.py, the config its weights were "
                       "trained or converted with")
    return config_from_saved(saved)
  explicit = set(explicit)
  differ = [d for d in model_differences(config, saved) if d[0] not in explicit and d[0] not in _FROM_CHECKPOINT]
  if differ:
    shown = "; ".join(f"{k}: {s!r} in the checkpoint, {g!r} in {given}" for k, s, g in differ[:8])
    more = f"; and {len(differ) - 8} more" if len(differ) > 8 else ""
    raise ValueError(f"{where} was saved with other model settings than {given}: {shown}{more}. Leave out --config "
                     "to use the checkpoint's own config, or set each value you mean to change as an explicit "
                     "--config.model.* override")
  config = copy.deepcopy(config)
  names = ((saved or {}).get("model") or {}).get("class_names")
  if names and "model.class_names" not in explicit and "class_names" in config.model:
    config.model.class_names = tuple(str(n) for n in names)
  return config


# ----------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM sets a flag that the trainer polls between steps; it then saves and exits cleanly.
# ----------------------------------------------------------------------------------------------------------------

class PreemptionHandler:
  """Installed by `install_preemption_handler`; `requested` turns True when one of its signals arrives."""

  def __init__(self, callback=None, signals=(signal.SIGTERM,)):
    self._callback = callback
    self._event = threading.Event()
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    # Python runs this in the main thread between two bytecodes, maybe in the middle of a step or a save, which is
    # why it only records the request: the trainer saves at the next step boundary.
    self.signum = signum
    self._event.set()
    log.warning("received %s: the trainer will save a checkpoint and stop", signal.Signals(signum).name)
    if self._callback is not None:
      try:
        self._callback()
      except Exception:  # an exception here would surface at an arbitrary line of the interrupted code
        log.exception("preemption callback failed")

  @property
  def requested(self) -> bool:
    """True once a signal has arrived (on this process)."""
    return self._event.is_set()

  def sync_requested(self) -> bool:
    """True if any process received a signal: a collective, so every process must call it at the same steps (so
    that all of them save the same step and stop together)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.asarray(flags).any())

  def uninstall(self) -> None:
    """Put the previous handlers back (the default action where the previous one was not installed from Python)."""
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.uninstall()


def install_preemption_handler(callback=None, *, signals=(signal.SIGTERM,)) -> PreemptionHandler:
  """Catch SIGTERM (what cluster schedulers and TPU maintenance send before killing a job) instead of dying.

  Args:
    callback: called with no arguments when the signal arrives, in the signal handler: it must be quick and must
      not save (set a flag, log); the trainer polls `handler.requested` between steps, saves with `force=True`,
      waits for the save and exits.
    signals: the signals to catch.

  Returns:
    The handler: `.requested`, `.sync_requested()` and `.uninstall()` (also a context manager) to restore the
    previous handlers. Must be called from the main thread (a Python restriction on signal handlers).
  """
  return PreemptionHandler(callback, tuple(signals))
