"""mrcnn_jax.train_checkpoint.TrainCheckpointer and mrcnn_jax.preemption: the trainer's resumable checkpoints.

The state here is a stand-in with the trainer's shape (a flax struct dataclass holding step, params, batch_stats and an
optax state), not the trainer's own class: the checkpointer works on any pytree.
"""

import os
import pathlib
import signal
import subprocess
import sys
import threading

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mrcnn_jax import preemption
from mrcnn_jax.train_checkpoint import TrainCheckpointer

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step directory being written
REPO = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState


def _state(seed=0, step=0) -> State:
  rng = np.random.default_rng(seed)
  params = {"backbone": {"conv": {"kernel": rng.standard_normal((3, 3, 3, 8)).astype(np.float32)}},
            "box_head": {"cls": {"kernel": rng.standard_normal((16, 4)).astype(np.float32),
                                 "bias": rng.standard_normal(4).astype(np.float32)}}}
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))  # EmptyState and TraceState
  opt_state = jax.tree.map(lambda x: x + 0.5, tx.init(params))  # non-zero, so that a lost value shows
  return State(step=jnp.asarray(step, jnp.int32), params=params,
               batch_stats={"mean": np.arange(8, dtype=np.float32), "count": np.arange(3, dtype=np.int32) + seed},
               opt_state=opt_state)


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(g, w)


def _visible(workdir) -> list[str]:
  return sorted(p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir())


def test_round_trip_with_data_state_and_config(tmp_path):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  # Saved from device arrays replicated over the 8 devices, as the trainer's state is.
  state = jax.device_put(_state(seed=1, step=7), NamedSharding(mesh, PartitionSpec()))
  data_state = bytes(range(256)) + b'{"next_index": 17}\x00'  # arbitrary bytes, not only text
  config = ml_collections.ConfigDict({"model": {"num_classes": 3, "sizes": (32, 64)}, "lr": 0.02})
  with TrainCheckpointer(tmp_path, keep=3) as ckpt:
    assert ckpt.save(7, state, data_state=data_state, config=config)
    ckpt.wait()
    assert _visible(tmp_path) == ["7"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "7").iterdir() if p.is_dir()) == [
        "config", "data_state", "state"]

  # A fresh checkpointer, as a restarted run has.
  with TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 7
    # Without a target: the tree as stored (dicts and lists), every leaf host numpy with its dtype.
    raw, got_data, step = ckpt.restore()
    assert step == 7 and got_data == data_state
    want = jax.tree_util.tree_flatten_with_path(_state(seed=1, step=7))[0]
    got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(raw)[0]}
    assert all(isinstance(v, np.ndarray) for v in got.values())
    assert len(got) == len(want)
    assert got["['batch_stats']['count']"].dtype == np.int32
    np.testing.assert_array_equal(got["['step']"], 7)

    # With an abstract target (what jax.eval_shape gives, with shardings): the same classes and shardings back.
    sharding = NamedSharding(mesh, PartitionSpec())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          jax.eval_shape(lambda: _state()))
    restored, got_data, step = ckpt.restore(7, target_state=target)
    assert isinstance(restored, State) and step == 7 and got_data == data_state
    _assert_trees_equal(restored, _state(seed=1, step=7))
    assert all(x.sharding == sharding for x in jax.tree.leaves(restored))
    # An eval_shape tree without shardings works too (those leaves land on the first device).
    restored, _, _ = ckpt.restore(target_state=jax.eval_shape(lambda: _state()))
    _assert_trees_equal(restored, _state(seed=1, step=7))

    assert ckpt.restore_config() == {"model": {"num_classes": 3, "sizes": [32, 64]}, "lr": 0.02}
    with pytest.raises(FileNotFoundError, match="step 8"):
      ckpt.restore(8)


def test_no_checkpoint_is_a_fresh_run(tmp_path):
  with TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore() is None
    assert ckpt.restore_config() is None
  with TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.save(0, {"w": np.ones(2, np.float32)}, data_state=None, config=None)
    ckpt.wait()
    _, data_state, step = ckpt.restore()
    assert (step, data_state, ckpt.restore_config()) == (0, None, None)


def test_keep_last_n_and_save_interval(tmp_path):
  with TrainCheckpointer(tmp_path, keep=2, save_interval_steps=2) as ckpt:
    saved = [ckpt.save(s, _state(seed=s, step=s), data_state=b"%d" % s) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]  # multiples of the interval only
    assert ckpt.save(7, _state(seed=7, step=7), data_state=b"7", force=True)  # e.g. at preemption or the end
    assert not ckpt.save(7, _state(seed=7, step=7), force=True)  # already saved: nothing to do, no error
    ckpt.wait()
    assert ckpt.latest_step() == 7
    assert ckpt.all_steps() == [6, 7]
  assert _visible(tmp_path) == ["6", "7"]
  with TrainCheckpointer(tmp_path) as ckpt:
    state, data_state, step = ckpt.restore(6)
    assert (step, data_state) == (6, b"6")
    np.testing.assert_array_equal(state["params"]["box_head"]["cls"]["bias"],
                                  _state(seed=6).params["box_head"]["cls"]["bias"])


# The child saves step 1 completely, then starts step 2 with a 64 MB array and says so; the parent kills it with
# SIGKILL. "finalize": the rename that publishes step 2 is made to hang, so the kill lands when every file of step 2
# is written but not yet published, the last moment a kill can interrupt a save. "write": the kill lands as soon as
# the asynchronous save has started, while the array is being written.
_KILLED_SAVE = """
import sys, time
import numpy as np
import orbax.checkpoint as ocp
from mrcnn_jax.checkpoint import TrainCheckpointer

workdir, moment = sys.argv[1], sys.argv[2]
ckpt = TrainCheckpointer(workdir, keep=3)
ckpt.save(1, {"w": np.full((4, 4), 1.0, np.float32), "step": np.int32(1)}, data_state=b"one")
ckpt.wait()
if moment == "finalize":
  async def hang(self):
    print("finalizing", flush=True)
    time.sleep(600)
  ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = hang
big = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
ckpt.save(2, {"w": np.full((4, 4), 2.0, np.float32), "step": np.int32(2), "big": big}, data_state=b"two")
print("saving", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("moment", ["finalize", "write"])
def test_save_killed_mid_way_leaves_the_previous_step(tmp_path, moment):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(tmp_path), moment], env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  watchdog = threading.Timer(120, child.kill)  # a child stuck before it prints would block the read below
  watchdog.start()
  try:
    awaited = "finalizing" if moment == "finalize" else "saving"
    for line in child.stdout:
      if line.strip() == awaited:
        break
    else:
      pytest.fail(f"the child exited before {awaited!r}: {child.stderr.read()[-3000:]}")
    os.kill(child.pid, signal.SIGKILL)
  finally:
    watchdog.cancel()
    child.kill()
    child.wait(timeout=60)
  assert child.returncode == -signal.SIGKILL

  visible = [n for n in _visible(tmp_path) if TMP_SUFFIX not in n]
  if moment == "finalize":
    # Step 2 was written in full but never renamed: it exists only under orbax's temporary name.
    assert _visible(tmp_path) == ["1", "2" + TMP_SUFFIX]
  assert visible in (["1"], ["1", "2"])  # never a partially visible step
  before = _visible(tmp_path)
  with TrainCheckpointer(tmp_path, read_only=True) as reader:  # e.g. an evaluator beside a running trainer
    assert reader.restore()[2] == int(visible[-1])
    with pytest.raises(ValueError, match="read-only"):
      reader.save(3, {"w": np.zeros(1, np.float32)}, force=True)
  assert _visible(tmp_path) == before  # a reader leaves temporary directories (maybe a live save's) alone

  with TrainCheckpointer(tmp_path) as ckpt:
    latest = ckpt.latest_step()
    assert latest == int(visible[-1])
    state, data_state, step = ckpt.restore()
    assert step == latest and data_state == {1: b"one", 2: b"two"}[latest]
    np.testing.assert_array_equal(state["w"], np.full((4, 4), float(latest), np.float32))
    # The run goes on: it saves the next step over the leftover, and the leftover is cleaned up.
    assert ckpt.save(3, {"w": np.zeros((4, 4), np.float32), "step": np.int32(3)})
    ckpt.wait()
    assert ckpt.restore()[2] == 3
  assert not [n for n in _visible(tmp_path) if TMP_SUFFIX in n]


def test_sigterm_sets_the_flag_and_the_old_handler_comes_back():
  calls = []
  original = signal.getsignal(signal.SIGTERM)

  def previous(signum, frame):
    calls.append("previous")

  signal.signal(signal.SIGTERM, previous)
  try:
    handler = preemption.install_preemption_handler(lambda: calls.append("callback"))
    assert not handler.requested
    os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next bytecode; the process lives on
    assert handler.requested and handler.sync_requested()
    assert handler.signum == signal.SIGTERM
    assert calls == ["callback"]
    handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous
    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == ["callback", "previous"]

    with preemption.install_preemption_handler() as handler:  # no callback: the flag alone
      os.kill(os.getpid(), signal.SIGTERM)
      assert handler.requested
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, original)


_RESTORE_ON_ONE_DEVICE = """
import sys
import jax, numpy as np
from mrcnn_jax.checkpoint import TrainCheckpointer

assert jax.device_count() == 1, jax.devices()
want = np.load(sys.argv[2])
with TrainCheckpointer(sys.argv[1]) as ckpt:
  state, data_state, step = ckpt.restore()
  assert (step, data_state) == (5, b"data@5"), (step, data_state)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert sorted(flat) == sorted(want.files), (sorted(flat), want.files)
  for k in want.files:
    assert isinstance(flat[k], np.ndarray) and flat[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(flat[k], want[k])
  # Onto this run's device with an abstract target.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  placed, _, _ = ckpt.restore(5, target_state=target)
  for k, v in jax.tree_util.tree_flatten_with_path(placed)[0]:
    assert v.sharding == device
    np.testing.assert_array_equal(np.asarray(v), want[jax.tree_util.keystr(k)])
print("ok")
"""


def test_saved_on_8_devices_restores_in_a_1_device_process(tmp_path):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  state = {"params": {"kernel": np.arange(64, dtype=np.float32).reshape(16, 4), "bias": np.ones(4, np.float32)},
           "step": np.int32(5), "count": np.arange(8, dtype=np.int32)}
  # Replicated leaves as the trainer's params, and one leaf sharded over the 8 devices.
  placed = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), state)
  placed["count"] = jax.device_put(state["count"], NamedSharding(mesh, PartitionSpec("data")))
  with TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.save(5, placed, data_state=b"data@5")
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  np.savez(tmp_path / "expected.npz", **flat)

  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, "-c", _RESTORE_ON_ONE_DEVICE, str(tmp_path), str(tmp_path / "expected.npz")],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


# Each of two processes (one CPU device each, as two hosts) feeds its own data shard, so each saves its own data
# iterator state; orbax writes the JSON item from process 0 only, so the checkpointer gathers them first.
_TWO_PROCESSES = """
import os, signal, sys
import jax, numpy as np
process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mrcnn_jax import preemption, train_checkpoint

assert jax.process_count() == 2 and jax.device_count() == 2
replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
state = {"w": jax.make_array_from_process_local_data(replicated, np.arange(6, dtype=np.float32).reshape(2, 3)),
         "step": jax.make_array_from_process_local_data(replicated, np.array(4, np.int32))}
mine = b"shard0\\x00" if process_id == 0 else None  # states of different lengths, and a missing one
with train_checkpoint.TrainCheckpointer(workdir) as ckpt:
  assert ckpt.save(4, state, data_state=mine, config={"a": 1})
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  restored, data_state, step = ckpt.restore(target_state=target)
  assert (step, data_state) == (4, mine), (step, data_state)
  np.testing.assert_array_equal(np.asarray(restored["w"].addressable_data(0)), np.arange(6).reshape(2, 3))

# Only process 1 is signalled; both learn it at the same step.
with preemption.install_preemption_handler() as handler:
  if process_id == 1:
    os.kill(os.getpid(), signal.SIGTERM)
  assert handler.requested == (process_id == 1)
  assert handler.sync_requested()
print("ok", flush=True)
"""


def test_two_processes_keep_their_own_data_state(tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  children = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(i), str(port), str(tmp_path)], env=env,
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  try:
    outputs = [c.communicate(timeout=120) for c in children]
  finally:
    for c in children:
      c.kill()
  for c, (out, err) in zip(children, outputs):
    assert c.returncode == 0 and out.strip().endswith("ok"), err[-3000:]
