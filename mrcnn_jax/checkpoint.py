"""Checkpoints on disk: variables checkpoints, and loading either kind of checkpoint for inference.

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

A train-state checkpoint (the trainer's, for exact resume: `mrcnn_jax.train_checkpoint`) is one orbax
CheckpointManager step directory, WORKDIR/checkpoints/<step>/ holding the state, the data iterators' states and the
config.

Inference and evaluation take either kind: `load_inference(path)` accepts a variables checkpoint, a training
workdir, its checkpoints/ directory or one step directory, and returns the variables and the saved config;
`inference_config` then gives the config to run them with (the saved one, or a given one that agrees with it).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mrcnn_jax import atomic
from mrcnn_jax.config_files import config_json
from mrcnn_jax.train_checkpoint import CHECKPOINTS_DIR, STATE_ITEM, TrainCheckpointer

FORMAT_VERSION = 1
VARIABLES_DIR = "variables"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"


def _is_nonempty_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any(path.iterdir())


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
  config_text = None if config is None else config_json(config)

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


