"""The training loop around the step, on a user's own small COCO set (tests/own_data.py: one category, id 7): the
source is checked against the config before anything compiles, class names come from the set, a diverging run
with train.skip_nonfinite stops after a bounded number of skipped steps, and no checkpoint holds a non-finite value."""

import json
import warnings

import jax
import numpy as np
import own_data
import pytest
import tiny_model

from mrcnn_jax import train, train_checkpoint, train_state
from mrcnn_jax.data import coco

# The trainer's tiny model, for the set's one class.
TRAIN_OVERRIDES = {**tiny_model.TRAIN, "model.num_classes": 1, "model.class_names": ()}


@pytest.fixture(scope="module")
def own_set(tmp_path_factory):
  # 12, 3 and 15 instances: two images over the 8 slots of input.max_instances.
  return own_data.write(tmp_path_factory.mktemp("own") / "set", train_counts=(12, 3, 15, 8, 1, 5, 9, 2))


def _config(paths, **values):
  return tiny_model.config({**TRAIN_OVERRIDES, **own_data.dataset_overrides(paths), **values})


def test_instances_beyond_max_instances_are_counted_in_one_warning(own_set):
  config = _config(own_set)
  source = coco.load_coco(own_set["train_json"], own_set["train_images"], train=True)
  counts = [len([a for a in json.loads(own_set["train_json"].read_text())["annotations"] if a["image_id"] == i])
            for i in range(1, 9)]
  over = [n for n in counts if n > 8]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train.check_training_source(config, source)
  assert len(caught) == 1
  message = str(caught[0].message)
  assert str(own_set["train_json"]) in message
  assert (f"{len(over)} of 8 images have more instances than input.max_instances = 8 (up to {max(counts)} in one "
          f"image): {sum(n - 8 for n in over)} instances are left out of training") in message
  assert f"--config.input.max_instances={max(counts)}" in message
  # The set's category names replace the config's, for the config saved with the checkpoints.
  assert config.model.class_names == (own_data.CATEGORY_NAME,)
  config.input.max_instances = max(counts)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    train.check_training_source(config, source)


def test_keypoint_configs_skip_training_images_with_too_few_visible_keypoints(tmp_path, load_config):
  """torchvision's Keypoint R-CNN recipe: images with fewer than 10 visible keypoints are not trained on (Detectron2's
  keeps images with at least 1, the base config's value)."""
  def person(ann_id, image_id, visible):
    keypoints = [v for k in range(17) for v in ((10 + k, 10 + k, 2) if k < visible else (0, 0, 0))]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [5, 5, 30, 40], "iscrowd": 0,
            "keypoints": keypoints, "num_keypoints": visible}

  names = [f"k{k}" for k in range(17)]
  dataset = {"images": [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2, 3)],
             "annotations": [person(1, 1, 9), person(2, 2, 10), person(3, 3, 0), person(4, 3, 4)],
             "categories": [{"id": 1, "name": "person", "keypoints": names}]}
  (tmp_path / "kp.json").write_text(json.dumps(dataset))
  for name, kept in (("keypoint_rcnn_R50_FPN_torchvision", [2]), ("keypoint_rcnn_R50_FPN_1x", [1, 2, 3])):
    config = load_config(name)
    config.dataset.train_json, config.dataset.train_image_dir = str(tmp_path / "kp.json"), str(tmp_path)
    source = train.load_train_source(config)
    assert [r.image_id for r in source.records] == kept, name
    assert source.stats["skipped_few_keypoints"] == 3 - len(kept)


@pytest.mark.parametrize("num_classes", [3, 2])
def test_a_model_with_another_number_of_classes_fails_before_training(own_set, tmp_path, num_classes):
  config = _config(own_set, **{"model.num_classes": num_classes})
  with pytest.raises(ValueError, match=rf"{own_set['train_json']} \(the training set\): the dataset has 1 "
                                       rf"categories \(nucleus\), the model has {num_classes} \(model.num_classes\)"):
    train.train(config, tmp_path / "w")
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_batch_that_does_not_divide_over_the_devices_fails_before_training(own_set, tmp_path):
  config = _config(own_set)  # batch 8
  with pytest.raises(ValueError, match=r"^train.batch_size=8 is not a multiple of the 3 devices it is sharded over$"):
    train.train(config, tmp_path / "w", devices=jax.devices()[:3])
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_diverging_run_stops_after_the_skipped_steps_and_saves_nothing_non_finite(own_set, tmp_path):
  """An absurd learning rate: the first update is finite (its loss was) but throws the parameters to ~1e30, and every
  later loss is non-finite. skip_nonfinite skips those updates, 3 in a row at most, then the run stops naming the
  step; every checkpoint written holds finite values only."""
  config = _config(own_set, **{"train.base_lr": 1e30, "train.skip_nonfinite": True,
                               "train.max_consecutive_nonfinite": 3, "train.checkpoint_every": 1})
  with pytest.raises(FloatingPointError, match=r"^3 non-finite steps in a row, the last at step 4 \(train.skip_non"
                                               r"finite skips at most train.max_consecutive_nonfinite = 3\)"):
    train.train(config, tmp_path / "w", devices=jax.devices()[:1])  # one device: the loop is the point
  lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert [(x["iteration"], x["nonfinite_skipped"]) for x in lines] == [(1, 0), (2, 1), (3, 1), (4, 1)]
  assert np.isfinite(lines[0]["total_loss"]) and not np.isfinite(lines[-1]["total_loss"])
  with train_checkpoint.TrainCheckpointer(tmp_path / "w", read_only=True) as ckpt:
    assert ckpt.all_steps()  # saved: the skipped steps keep the (finite) parameters of step 1
    for step in ckpt.all_steps():
      for leaf in jax.tree.leaves(ckpt.restore(step)[0]):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), step


def test_parameters_that_are_not_finite_are_never_saved(own_set, tmp_path, monkeypatch):
  """A step whose loss is finite but whose update overflows the parameters (a learning rate near float32's limit):
  the checkpoint due after it is refused and the run stops naming the step. The state and the step are stand-ins (a
  step that makes the parameters infinite), so that no model compiles; the loop and the checkpointer are the real
  ones."""
  import jax.numpy as jnp

  def small_state(config, key, canvas_hw=None):  # the loop calls create_train_state(config, key)
    del config, key, canvas_hw
    return train_state.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones((3,))}, batch_stats={},
                                  opt_state={})

  def overflowing_step(config, model, mesh):
    del config, model, mesh

    def step(state, batch):
      del batch
      params = jax.tree.map(lambda p: p * jnp.inf, state.params)
      metrics = {"total_loss": jnp.float32(1.0), "finite": jnp.bool_(True), "nonfinite_skipped": jnp.int32(0)}
      return state.replace(step=state.step + 1, params=params), metrics
    return step

  monkeypatch.setattr(train, "create_train_state", small_state)
  monkeypatch.setattr(train, "jit_train_step", overflowing_step)
  config = _config(own_set, **{"train.checkpoint_every": 2})
  with pytest.raises(FloatingPointError, match=r"^the parameters are not finite after step 2 .*; not saved: no "
                                               r"checkpoint was saved yet"):
    train.train(config, tmp_path / "w")
  with train_checkpoint.TrainCheckpointer(tmp_path / "w", read_only=True) as ckpt:
    assert ckpt.all_steps() == []
