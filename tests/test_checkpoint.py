"""mrcnn_jax.checkpoint: variables round-trip through orbax, config/metadata beside them, atomic (over)writes (an
interrupted one: tests/test_atomic.py)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mrcnn_jax import checkpoint


def _variables(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return {
      "params": {
          "backbone": {"stem_conv": {"kernel": f32(7, 7, 3, 8)}},
          "box_head": {"fc1": {"kernel": f32(16, 4), "bias": f32(4)}},
      },
      "batch_stats": {"backbone": {"stem_norm": {"mean": f32(8), "var": np.abs(f32(8))}}},
  }


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert isinstance(g, np.ndarray)
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(g, w)


def _siblings(path: pathlib.Path):
  """What lies beside `path`: temporary or moved-aside directories must not survive a save."""
  return sorted(p.name for p in path.parent.iterdir())


def test_round_trip_with_config_and_metadata(tmp_path):
  variables = _variables()
  config = ml_collections.ConfigDict({"model": {"num_classes": 3, "sizes": (32, 64)}, "name": "tiny"})
  out = checkpoint.save_variables(tmp_path / "ckpt", variables, config=config,
                                  metadata={"source": "test", "file": "x.pth"})
  assert out == (tmp_path / "ckpt").absolute()
  assert _siblings(out) == ["ckpt"]
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "metadata.json", "variables"]
  _assert_trees_equal(checkpoint.load_variables(out), variables)
  assert checkpoint.load_config_json(out) == {"model": {"num_classes": 3, "sizes": [32, 64]}, "name": "tiny"}
  assert checkpoint.load_metadata_json(out) == {"format_version": 1, "source": "test", "file": "x.pth"}
  assert json.loads((out / "metadata.json").read_text())["format_version"] == checkpoint.FORMAT_VERSION


def test_without_config(tmp_path):
  checkpoint.save_variables(tmp_path / "ckpt", _variables())
  assert checkpoint.load_config_json(tmp_path / "ckpt") is None


def test_refuses_to_overwrite_and_overwrite_replaces(tmp_path):
  target = tmp_path / "ckpt"
  checkpoint.save_variables(target, _variables(0))
  with pytest.raises(FileExistsError, match="ckpt"):
    checkpoint.save_variables(target, _variables(1))
  _assert_trees_equal(checkpoint.load_variables(target), _variables(0))

  checkpoint.save_variables(target, _variables(1), overwrite=True)
  _assert_trees_equal(checkpoint.load_variables(target), _variables(1))
  assert _siblings(target) == ["ckpt"]


def test_empty_existing_directory_is_used(tmp_path):
  (tmp_path / "ckpt").mkdir()
  checkpoint.save_variables(tmp_path / "ckpt", _variables())
  _assert_trees_equal(checkpoint.load_variables(tmp_path / "ckpt"), _variables())


def test_load_errors_name_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_ckpt"):
    checkpoint.load_variables(tmp_path / "no_such_ckpt")
  (tmp_path / "not_a_ckpt").mkdir()
  with pytest.raises(FileNotFoundError, match="not_a_ckpt"):
    checkpoint.load_variables(tmp_path / "not_a_ckpt")
  (tmp_path / "half_written" / "variables").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="half_written"):
    checkpoint.load_variables(tmp_path / "half_written")


def test_saved_sharded_over_8_devices_loads_in_a_1_device_process(tmp_path):
  """Arrays sharded over this session's 8 CPU devices load as host numpy in a fresh process with one device."""
  assert jax.device_count() == 8
  variables = _variables()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data") if x.shape[0] % 8 == 0
                                                else PartitionSpec())), variables)
  checkpoint.save_variables(tmp_path / "ckpt", sharded)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  np.savez(tmp_path / "expected.npz", **flat)

  script = textwrap.dedent(f"""
      import jax, numpy as np
      from mrcnn_jax import checkpoint
      assert jax.device_count() == 1, jax.devices()
      got = checkpoint.load_variables({str(tmp_path / "ckpt")!r})
      flat = {{jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}}
      want = np.load({str(tmp_path / "expected.npz")!r})
      assert sorted(flat) == sorted(want.files), (sorted(flat), want.files)
      for k in want.files:
        assert isinstance(flat[k], np.ndarray) and flat[k].dtype == np.float32, k
        np.testing.assert_array_equal(flat[k], want[k])
      print("ok")
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------------------------------------------
# The config a checkpoint runs with (evaluate, predict, export, Predictor.from_checkpoint).
# ----------------------------------------------------------------------------------------------------------------


def _saved(config) -> dict:
  """A config as a checkpoint stores it (JSON), read back as load_inference returns it."""
  return json.loads(config.to_json_best_effort())


def test_inference_config_without_a_given_config_is_the_saved_one(load_config):
  config = load_config("shapes")
  rebuilt = checkpoint.inference_config(_saved(config))
  assert rebuilt.is_locked and rebuilt.to_dict() == config.to_dict()  # tuples back as tuples, placeholders None
  assert rebuilt.model.anchors.sizes == ((16,), (32,), (64,), (128,), (256,))
  with pytest.raises(ValueError, match="checkpoint X carries no config: pass --config="):
    checkpoint.inference_config(None, where="checkpoint X")


def test_a_given_config_must_have_the_checkpoints_model_except_explicit_fields(load_config):
  trained = load_config("shapes")
  trained.model.num_classes, trained.model.class_names = 1, ("nucleus",)
  saved = _saved(trained)
  given = load_config("shapes")  # the config file without the training run's overrides
  given.model.roi_heads.score_thresh_test = 0.3
  with pytest.raises(ValueError, match=r"^ckpt was saved with other model settings than --config=shapes.py: "
                                       r"model.num_classes: 1 in the checkpoint, 3 in --config=shapes.py; "
                                       r"model.roi_heads.score_thresh_test: 0.05 in the checkpoint, 0.3 in "):
    checkpoint.inference_config(saved, given, where="ckpt", given="--config=shapes.py")
  # Typed on the command line: the user's values stand. The class names come from the checkpoint, on a copy.
  config = checkpoint.inference_config(saved, given, explicit={"model.num_classes",
                                                               "model.roi_heads.score_thresh_test"})
  assert config.model.num_classes == 3 and config.model.roi_heads.score_thresh_test == 0.3
  assert config.model.class_names == ("nucleus",) and given.model.class_names == ("circle", "square", "triangle")
  assert checkpoint.inference_config(saved, given, explicit={"model.num_classes", "model.class_names",
                                                             "model.roi_heads.score_thresh_test"}
                                     ).model.class_names == ("circle", "square", "triangle")
  # Fields only one side has (a checkpoint from before a field existed) are no difference; nor is a missing config.
  del saved["model"]["class_names"]
  assert checkpoint.model_differences(given, saved) == [("model.num_classes", 1, 3),
                                                        ("model.roi_heads.score_thresh_test", 0.05, 0.3)]
  assert checkpoint.inference_config(None, given).to_dict() == given.to_dict()
