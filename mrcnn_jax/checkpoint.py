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

The trainer's train-state checkpoints (CheckpointManager: step, optimizer state, data iterator) will live here too.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

FORMAT_VERSION = 1
VARIABLES_DIR = "variables"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"


def _move(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Rename a directory (atomic on one filesystem). A function of its own so that tests can simulate a failure."""
  os.rename(src, dst)


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

  directory.parent.mkdir(parents=True, exist_ok=True)
  # A sibling, so that the final rename stays on one filesystem; hidden, so that nothing mistakes it for a run.
  tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / VARIABLES_DIR, host_variables)
      ckptr.wait_until_finished()  # the save is asynchronous; the rename below must see it complete
    if config_text is not None:
      (tmp / CONFIG_FILE).write_text(config_text + "\n")
    (tmp / METADATA_FILE).write_text(meta_text + "\n")
    _commit(tmp, directory)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return directory


def _commit(tmp: pathlib.Path, directory: pathlib.Path) -> None:
  """Rename the finished `tmp` to `directory`, moving an existing one aside first and back if the rename fails."""
  if not directory.exists() or not _is_nonempty_dir(directory):
    if directory.exists():
      directory.rmdir()  # empty: nothing to keep, and rename onto a directory is not portable
    _move(tmp, directory)
    return
  old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
  _move(directory, old)
  try:
    _move(tmp, directory)
  except BaseException:
    _move(old, directory)
    raise
  shutil.rmtree(old, ignore_errors=True)


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
