"""The training loop resumes exactly: 6 steps straight and 3 steps + restart + 3 steps end with the same params and
the same loss curve (checkpointed params, optimizer state, step, and the input iterator's position); metrics.jsonl
holds each step once, even after a killed run logged steps past its checkpoint, and the TensorBoard events of the
calls read back as the same one series."""

import json

import jax
import numpy as np
import pytest

from mrcnn_jax import train, train_log
from mrcnn_jax.data import coco, shapes

import tiny_model


def _config(data_dir):
  """The tiny training setup (tests/tiny_model.py), with a 2-step warmup so that the resumed schedule is checked."""
  return tiny_model.config({**tiny_model.TRAIN, "train.warmup_iters": 2,
                            "dataset.train_json": str(data_dir / "annotations" / "instances_train.json"),
                            "dataset.train_image_dir": str(data_dir / "train")})


def _losses(workdir):
  return [json.loads(line)["total_loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(workdir):
  """{tag: [(step, value), ...]} of `<workdir>/tensorboard` as TensorBoard reads it."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_tensorboard_matches_jsonl(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  scalars = _tensorboard_scalars(workdir)
  tags = set(records[0]) - {"iteration"}
  assert {"total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask", "lr", "time",
          "data_time"} <= tags
  assert set(scalars) == tags
  for tag in tags:
    assert [step for step, _ in scalars[tag]] == [r["iteration"] for r in records]
    # TensorBoard stores float32.
    np.testing.assert_array_equal([v for _, v in scalars[tag]], np.float32([r[tag] for r in records]))


def test_resume_gives_the_same_run(tmp_path):
  shapes.write_dataset(tmp_path / "data", 24, 0, seed=0, size_hw=(64, 64))
  config = _config(tmp_path / "data")
  source = coco.load_coco(config.dataset.train_json, config.dataset.train_image_dir, train=True)

  straight = train.train(config, tmp_path / "a", source=source)
  train.train(config, tmp_path / "b", source=source, stop_after=3)
  assert len(_losses(tmp_path / "b")) == 3
  # A run that went on from the checkpoint of step 3, logged steps 4 and 5, and was killed (kill -9) before saving
  # again: its lines and events are in the workdir, and the resumed run replays those steps.
  with train_log.JsonlWriter(tmp_path / "b" / "metrics.jsonl") as killed:
    for step in (4, 5):
      killed.write(step, {"total_loss": 99.0, "lr": 0.5})
  with train_log.TensorBoardWriter(tmp_path / "b" / "tensorboard", start_step=3) as killed:
    for step in (4, 5):
      killed.write(step, {"total_loss": 99.0, "lr": 0.5})
  resumed = train.train(config, tmp_path / "b", source=source)

  assert int(straight.step) == int(resumed.step) == 6
  np.testing.assert_allclose(_losses(tmp_path / "b"), _losses(tmp_path / "a"), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # Each step once in metrics.jsonl (the killed run's 4 and 5 dropped, the assert_allclose above compares the whole
  # series), and the three event files read back as the same one series.
  _assert_tensorboard_matches_jsonl(tmp_path / "b")
  assert len(list((tmp_path / "b" / "tensorboard").iterdir())) == 3
  losses = _losses(tmp_path / "a")
  assert len(set(losses)) == 6  # the steps differ (a test that compared one repeated batch would pass trivially)


def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
  """Two good steps are checkpointed; then the input overflows (pixel_std ~ 0 makes the images inf): step 3's loss is
  not finite, the run stops naming it and checkpoint 2, which stays restorable and untouched."""
  from mrcnn_jax import train_checkpoint

  shapes.write_dataset(tmp_path / "data", 8, 0, seed=0, size_hw=(64, 64))
  config = _config(tmp_path / "data")
  config.train.checkpoint_every = 1
  source = coco.load_coco(config.dataset.train_json, config.dataset.train_image_dir, train=True)
  good = train.train(config, tmp_path / "w", source=source, stop_after=2)

  config.input.pixel_std = (1e-45, 1e-45, 1e-45)
  with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3: .*last good checkpoint is step 2"):
    train.train(config, tmp_path / "w", source=source)
  with train_checkpoint.TrainCheckpointer(tmp_path / "w") as ckpt:
    assert ckpt.all_steps() == [1, 2]
    state, _, step = ckpt.restore()
  assert step == 2
  for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

