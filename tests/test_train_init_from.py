"""Fine-tuning (init_from): a checkpoint of a 5-class model merged into a fresh 3-class model keeps everything
but the class-dependent predictors, reports what it left out, and the trainer starts a fresh run from it (a resumed
run ignores it).

The merge tests use random stand-ins for trained weights with the shapes of a tiny model (`jax.eval_shape`, a few
seconds); the trainer test initializes and compiles the tiny model, runs one step and resumes, about 2 min on 2 cores.
"""

import json
import logging

import jax
import numpy as np

from mrcnn_jax import checkpoint, train, train_state
from mrcnn_jax.data import coco, shapes
from mrcnn_jax.modeling import mask_rcnn

import tiny_model

CANVAS = (64, 64)
# The runs train on one device (the loading of init_from is the point; the 8-device step is test_train_step's).
ONE_DEVICE = jax.devices()[:1]
# The leaves whose shapes depend on the number of classes K, as (3-class model, 5-class source) shapes: K + 1 logits,
# 4 (K + 1) box deltas (background included, mrcnn_jax's layout), K + 1 mask channels; fc_dim 32, mask conv_dim 16.
CLASS_DEPENDENT = {
    "params/box_head/cls_score/kernel": ((32, 4), (32, 6)),
    "params/box_head/cls_score/bias": ((4,), (6,)),
    "params/box_head/bbox_pred/kernel": ((32, 16), (32, 24)),
    "params/box_head/bbox_pred/bias": ((16,), (24,)),
    "params/mask_head/predictor/kernel": ((1, 1, 16, 4), (1, 1, 16, 6)),
    "params/mask_head/predictor/bias": ((4,), (6,)),
}


def _config(num_classes):
  """The tiny training setup (tests/tiny_model.py) with the base config's FrozenBN and frozen stem and res2, whose
  statistics a fine-tuned model takes from its source; one step, checkpointed."""
  frozen_bn = {k: v for k, v in tiny_model.TRAIN.items() if k not in ("model.backbone.norm", "model.backbone.freeze_at")}
  return tiny_model.config({**frozen_bn, "model.num_classes": num_classes, "model.class_names": (),
                            "train.max_iter": 1, "train.checkpoint_every": 1})


def _flat(tree):
  return {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _random_variables(config, seed):
  """Variables shaped like the config's model, every leaf drawn at random (stand-ins for trained weights)."""
  abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0), CANVAS))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


def test_merge_loads_every_leaf_but_the_class_dependent_predictors():
  init = _random_variables(_config(3), seed=0)
  source = _random_variables(_config(5), seed=1)
  merged, report = train_state.merge_pretrained(init, source)

  flat_init, flat_source, flat_merged = _flat(init), _flat(source), _flat(merged)
  assert flat_merged.keys() == flat_init.keys()
  assert any(p.startswith("params/backbone/") for p in flat_merged) and "params/box_head/fc1/kernel" in flat_merged
  for path, value in flat_merged.items():
    expected = flat_init[path] if path in CLASS_DEPENDENT else flat_source[path]
    np.testing.assert_array_equal(value, expected, err_msg=path)
    assert value.dtype == np.float32
  assert {path: (a, b) for path, a, b in report.shape_mismatch} == CLASS_DEPENDENT
  assert sorted(report.loaded) == sorted(set(flat_init) - set(CLASS_DEPENDENT))
  assert report.missing == report.unused == ()


def test_merge_reports_what_it_left_out(caplog):
  init = _random_variables(_config(3), seed=0)
  source = _random_variables(_config(5), seed=1)
  del source["params"]["mask_head"]  # e.g. Faster R-CNN weights ...
  source["params"]["keypoint_head"] = {"conv1": {"kernel": np.ones((3, 3, 32, 16), np.float32),  # ... with extras
                                                 "bias": np.ones((16,), np.float32)}}
  merged, report = train_state.merge_pretrained(init, source)

  mask_head = sorted(p for p in _flat(init) if p.startswith("params/mask_head/"))
  assert len(mask_head) == 12  # conv1..4, deconv, predictor: kernel and bias each
  assert sorted(report.missing) == mask_head
  assert report.unused == ("params/keypoint_head/conv1/bias", "params/keypoint_head/conv1/kernel")
  for path in mask_head:
    np.testing.assert_array_equal(_flat(merged)[path], _flat(init)[path])

  with caplog.at_level(logging.INFO, logger="mrcnn_jax.train_state"):
    train_state.log_merge_report(report, "SRC")
  text = caplog.text
  assert f"init_from SRC: loaded {len(report.loaded)} of the model's {len(_flat(init))} variables" in text
  assert "4 variables not loaded, their shapes differ" in text  # the box predictor's
  assert "params/box_head/cls_score/kernel model (32, 4) vs source (32, 6)" in text
  assert "12 variables not in the source (kept as initialized): params/mask_head/* (12)" in text
  assert "2 source variables unused (not in the model): params/keypoint_head/* (2)" in text


def test_collapse_paths_names_whole_subtrees_once():
  universe = ["params/fpn/a/kernel", "params/fpn/a/bias", "params/fpn2/kernel", "params/rpn/conv/kernel",
              "params/rpn/conv/bias"]
  assert train_state.collapse_paths(["params/fpn/a/kernel", "params/fpn/a/bias", "params/rpn/conv/bias"], universe) == [
      "params/fpn/* (2)", "params/rpn/conv/bias"]
  # A subtree of one leaf is named by its leaf; "fpn2" is no part of "fpn".
  assert train_state.collapse_paths(["params/fpn2/kernel"], universe) == ["params/fpn2/kernel"]
  assert train_state.collapse_paths(universe, universe) == ["params/* (5)"]


def test_train_starts_from_init_from_and_a_resumed_run_ignores_it(tmp_path, caplog):
  shapes.write_dataset(tmp_path / "data", 16, 0, seed=0, size_hw=CANVAS)
  source = coco.load_coco(str(tmp_path / "data" / "annotations" / "instances_train.json"),
                          str(tmp_path / "data" / "train"), train=True)
  # A "trained" 5-class model: initialized with another seed, its FrozenBN statistics moved off their init.
  pretrained = mask_rcnn.random_variables(_config(5), 1)
  rng = np.random.default_rng(0)
  pretrained = {"params": pretrained["params"],
                "batch_stats": jax.tree.map(lambda x: np.asarray(x) + rng.uniform(0.1, 0.2, x.shape).astype(np.float32),
                                            pretrained["batch_stats"])}
  checkpoint.save_variables(tmp_path / "pretrained", pretrained)

  config = _config(3)
  config.init_from = str(tmp_path / "pretrained")
  config.train.base_lr = 0.0  # the step runs, and leaves the params it started from for the test to see
  with caplog.at_level(logging.INFO, logger="mrcnn_jax.train_state"):
    state = train.train(config, tmp_path / "run", source=source, devices=ONE_DEVICE)
  assert int(state.step) == 1
  assert np.isfinite(json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["total_loss"])
  flat_state = _flat({"params": state.params, "batch_stats": state.batch_stats})
  flat_source = _flat(pretrained)
  assert flat_state.keys() == flat_source.keys()
  for path, value in flat_state.items():
    if path in CLASS_DEPENDENT:
      assert value.shape == CLASS_DEPENDENT[path][0]
    else:
      np.testing.assert_array_equal(value, flat_source[path], err_msg=path)
  assert "6 variables not loaded, their shapes differ" in caplog.text

  # Resumed: its own checkpoint wins; init_from is not even read.
  config.init_from = str(tmp_path / "nowhere")
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="mrcnn_jax.train"):
    resumed = train.train(config, tmp_path / "run", source=source, devices=ONE_DEVICE)
  assert f"init_from={tmp_path / 'nowhere'} ignored" in caplog.text
  assert int(resumed.step) == 1
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
