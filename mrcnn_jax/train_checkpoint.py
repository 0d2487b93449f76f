"""The trainer's checkpoints: one orbax CheckpointManager step directory per saved step, for exact resume.

  WORKDIR/checkpoints/<step>/state/        the train-state pytree (params, batch_stats, opt_state, step, ...)
  WORKDIR/checkpoints/<step>/data_state/   JSON: every process's data iterator state (grain's bytes, base64)
  WORKDIR/checkpoints/<step>/config/       JSON: the run's config

`TrainCheckpointer` wraps the manager: saves are asynchronous, the last `keep` steps are kept, and orbax writes each
step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once every item is written
(AtomicRenameTemporaryPath), so a save killed at any point leaves the previous steps as they were and no visible
partial step. A state restores onto any number of devices (the saving run's sharding is never rebuilt).

Inference reads these directories through `checkpoint.load_inference`, which also takes a variables checkpoint;
preemption (SIGTERM between steps) is `mrcnn_jax.preemption`.

orbax API: `CheckpointManager` with `item_handlers` (StandardCheckpointHandler, JsonCheckpointHandler),
`args.Composite` of `StandardSave`/`StandardRestore` and `JsonSave`/`JsonRestore`, `item_metadata`, and the
`checkpoint_managers` policies (`LatestN`, `FixedIntervalPolicy`; releases without them get `max_to_keep` and
`save_interval_steps`). Tested with 0.12.8.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mrcnn_jax.config_files import config_json

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data_state", "config"

log = logging.getLogger(__name__)

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


class TrainCheckpointer(contextlib.AbstractContextManager):
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
    config_item = None if config is None else json.loads(config_json(config))
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

  def __exit__(self, *exc):
    self.close()
