"""`python -m mrcnn_jax.predict`: overlays and predictions.json from a checkpoint, the same detections as the Predictor.

Runs the command in a fresh interpreter outside the checkout (the source tree's mrcnn_jax has no kernels/ subpackage)
on a tiny random-init model (ResNet-18 at a quarter width, 64 x 64 canvas): random weights still give detections,
enough to check that what the command writes is what the Predictor returns. The checkpoint's saved config differs
from the test's in one inference setting and in its class names, so that which config a run used shows.
"""

import copy
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from mrcnn_jax import checkpoint
from mrcnn_jax.data import shapes
from mrcnn_jax.data.images import read_image
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.predictor import Predictor

import tiny_model
from conftest import command_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "mask_rcnn_R50_FPN_1x.py"
CANVAS = 64
# The tiny model as command-line overrides of the base config, applied alike in this process and in the command.
OVERRIDES = tiny_model.overrides(CANVAS, 48, **tiny_model.UNIT_PIXEL_STD_KW)
IMAGE_SIZES = {"a.png": (48, 64), "b.jpg": (64, 40), "c.png": (30, 30)}
# Random weights score these images' detections 0.45..0.64: the threshold keeps some of them.
SCORE_THRESHOLD = 0.5
# What the checkpoint's saved config has where the test's config differs.
SAVED_NMS_THRESH, SAVED_CLASS_NAMES = 0.6, ("disc", "ring", "blob")


def _tiny_config():
  return tiny_model.config(OVERRIDES)


def _run(args, cwd, config=True, overrides=OVERRIDES):
  """The command, with --config and the tiny model's overrides unless config is False."""
  flags = [f"--config={BASE_CONFIG}", *tiny_model.flags(overrides)] if config else []
  return subprocess.run(
      [sys.executable, "-m", "mrcnn_jax.predict", *flags, *args],
      cwd=cwd, capture_output=True, text=True, env=command_env(), timeout=300,
      check=False)


def _write_images(directory: pathlib.Path) -> list[pathlib.Path]:
  directory.mkdir()
  rng = np.random.default_rng(0)
  paths = []
  for name, (h, w) in IMAGE_SIZES.items():
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = (230, 40, 40)  # something object-like
    Image.fromarray(image).save(directory / name, quality=95)
    paths.append(directory / name)
  return paths


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """(the test's config, variables, checkpoint path, the config saved with it)."""
  config = _tiny_config()
  variables = jax.device_get(mask_rcnn.init_variables(config, jax.random.key(0), (CANVAS, CANVAS)))
  saved = copy.deepcopy(config)
  saved.model.roi_heads.nms_thresh_test = SAVED_NMS_THRESH
  saved.model.class_names = SAVED_CLASS_NAMES
  path = checkpoint.save_variables(tmp_path_factory.mktemp("ckpt") / "tiny", variables, config=saved)
  return config, variables, path, saved


def test_overlays_and_json_match_the_predictor(tiny_checkpoint, tmp_path):
  config, variables, ckpt, _ = tiny_checkpoint
  paths = _write_images(tmp_path / "in")
  out = tmp_path / "out"
  # One path after --images, the rest as following arguments, as a shell glob gives them. The model field where
  # the checkpoint's config differs is typed as an explicit override, so --config stands; so are the class names
  # (in OVERRIDES).
  done = _run(["--checkpoint", str(ckpt), "--images", *map(str, paths), "--out", str(out),
               f"--score_threshold={SCORE_THRESHOLD}", "--batch_size=2",
               f"--config.model.roi_heads.nms_thresh_test={config.model.roi_heads.nms_thresh_test}"], cwd=tmp_path)
  assert done.returncode == 0, done.stderr

  assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "predictions.json"]
  predictions = json.loads((out / "predictions.json").read_text())
  assert predictions["class_names"] == ["background", *shapes.CLASSES]
  assert list(predictions["images"]) == [str(p) for p in paths] and predictions["errors"] == {}

  expected = Predictor(config, variables, batch_size=2)([read_image(p) for p in paths])
  kept = [r["scores"] >= SCORE_THRESHOLD for r in expected]
  assert 0 < sum(k.sum() for k in kept) < sum(len(k) for k in kept)  # the threshold keeps some, not all
  for path, result, keep in zip(paths, expected, kept):
    result = {k: v[keep] for k, v in result.items()}
    entry = predictions["images"][str(path)]
    h, w = IMAGE_SIZES[path.name]
    assert (entry["height"], entry["width"], entry["overlay"]) == (h, w, f"{path.stem}.png")
    instances = entry["instances"]
    assert [i["label"] for i in instances] == result["labels"].tolist()
    assert [i["name"] for i in instances] == [shapes.CLASSES[label - 1] for label in result["labels"]]
    np.testing.assert_allclose([i["score"] for i in instances], result["scores"], rtol=1e-5)
    # Relative, as for the scores: the command runs on 1 CPU device, this process on 8 (conftest), and XLA compiles
    # the two programs with other fusions, so a box corner may differ in its 6th significant digit (CI saw 1.6e-4 px
    # on a coordinate of 31.4).
    np.testing.assert_allclose(np.reshape([i["box"] for i in instances], (-1, 4)), result["boxes"], rtol=1e-5,
                               atol=1e-4)
    for instance, mask in zip(instances, result["masks"]):
      assert instance["segmentation"]["size"] == [h, w]
      np.testing.assert_array_equal(mask_util.decode(instance["segmentation"]).astype(bool), mask)

    overlay = np.asarray(Image.open(out / entry["overlay"]))
    assert overlay.shape == (h, w, 3) and overlay.dtype == np.uint8
    if instances:
      assert (overlay != read_image(path)).any()
    elif path.suffix == ".png":
      np.testing.assert_array_equal(overlay, read_image(path))  # nothing to draw: the image as it was


def test_without_config_a_folder_with_bad_files_gives_every_readable_image_its_results(tiny_checkpoint, tmp_path):
  """No --config: the checkpoint's own config (its NMS setting, its class names). --images takes a folder (its
  image files, sorted), a glob and a missing file; the bad ones are skipped, named, and listed, and the exit
  status says so. A 16-bit PNG gives the detections of the 8-bit image it was made from."""
  config, variables, ckpt, saved = tiny_checkpoint
  folder = tmp_path / "in"
  _write_images(folder)
  image8 = read_image(folder / "c.png")
  samples = image8[..., 0].astype(np.uint16) * 257  # 16-bit grey, read back by the high byte: image8's red channel
  Image.fromarray(samples).save(folder / "d16.png")
  (folder / "corrupt.jpg").write_bytes(b"not an image at all")
  (folder / "empty.png").write_bytes(b"")
  (folder / "notes.txt").write_text("not an image file by its extension: not listed")
  (tmp_path / "more").mkdir()
  Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(tmp_path / "more" / "e.png")
  missing = tmp_path / "missing.png"
  out = tmp_path / "out"
  done = _run(["--checkpoint", str(ckpt), "--images", str(folder), str(tmp_path / "more" / "*.png"), str(missing),
               "--out", str(out), f"--score_threshold={SCORE_THRESHOLD}", "--batch_size=2"], cwd=tmp_path,
              config=False)
  assert done.returncode == 1, done.stderr
  assert "Traceback" not in done.stderr

  good = [folder / n for n in ("a.png", "b.jpg", "c.png", "d16.png")] + [tmp_path / "more" / "e.png"]
  bad = [folder / "corrupt.jpg", folder / "empty.png", missing]
  predictions = json.loads((out / "predictions.json").read_text())
  assert list(predictions["images"]) == [str(p) for p in good]
  assert sorted(predictions["errors"]) == sorted(str(p) for p in bad)
  skipped = [line for line in done.stderr.splitlines() if "skipped: " in line]
  for path in bad:
    assert len([line for line in skipped if str(path) in line]) == 1, (path, done.stderr)
    assert str(path) in predictions["errors"][str(path)]
  assert sorted(p.name for p in out.iterdir()) == sorted([f"{p.stem}.png" for p in good] + ["predictions.json"])
  assert predictions["class_names"] == ["background", *SAVED_CLASS_NAMES]

  expected_config = checkpoint.config_from_saved(json.loads(saved.to_json_best_effort()))
  assert expected_config.model.roi_heads.nms_thresh_test == SAVED_NMS_THRESH
  gray8 = np.repeat(image8[..., :1], 3, axis=2)
  expected = Predictor(expected_config, variables, batch_size=2)([read_image(folder / "a.png"), gray8])
  for path, result in zip((folder / "a.png", folder / "d16.png"), expected):
    keep = result["scores"] >= SCORE_THRESHOLD
    instances = predictions["images"][str(path)]["instances"]
    assert [i["label"] for i in instances] == result["labels"][keep].tolist()
    assert [i["name"] for i in instances] == [SAVED_CLASS_NAMES[label - 1] for label in result["labels"][keep]]
    np.testing.assert_allclose([i["score"] for i in instances], result["scores"][keep], rtol=1e-5)
  assert predictions["images"][str(folder / "d16.png")]["instances"], "the 16-bit image should show detections"


def test_strict_stops_at_a_missing_or_corrupt_image_before_the_model_runs(tiny_checkpoint, tmp_path):
  _, _, ckpt, _ = tiny_checkpoint
  good = _write_images(tmp_path / "in")[0]
  corrupt = tmp_path / "in" / "corrupt.jpg"
  corrupt.write_bytes(b"not an image at all")
  missing = tmp_path / "in" / "missing.png"
  for bad in (missing, corrupt):
    done = _run(["--checkpoint", str(ckpt), "--strict", "--images", str(good), str(bad), "--out",
                 str(tmp_path / "out")], cwd=tmp_path, config=False)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 1 and len(errors) == 1 and str(bad) in errors[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_a_config_whose_model_differs_from_the_checkpoint_is_refused_naming_the_fields(tiny_checkpoint, tmp_path):
  """--config's model fields must be the checkpoint's unless typed as overrides: here fpn.channels is left at the
  base config's 256 (the checkpoint has 32) and the NMS threshold differs."""
  _, _, ckpt, _ = tiny_checkpoint
  image = _write_images(tmp_path / "in")[0]
  done = _run(["--checkpoint", str(ckpt), "--images", str(image), "--out", str(tmp_path / "out")], cwd=tmp_path,
              overrides={k: v for k, v in OVERRIDES.items() if k != "model.fpn.channels"})
  errors = [line for line in done.stderr.splitlines() if "error:" in line]
  assert done.returncode == 1 and len(errors) == 1, done.stderr
  assert "model.fpn.channels: 32 in the checkpoint, 256 in --config=" in errors[0]
  assert "model.roi_heads.nms_thresh_test: 0.6 in the checkpoint, 0.5 in --config=" in errors[0]
  assert "model.class_names" not in errors[0]  # names come from the checkpoint; never a reason to refuse
  assert not (tmp_path / "out").exists()


def test_overlay_names_must_not_collide(tmp_path):
  (tmp_path / "x").mkdir()
  (tmp_path / "y").mkdir()
  for d in ("x", "y"):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / d / "same.png")
  done = _run(["--checkpoint", str(tmp_path), "--images", str(tmp_path / "x" / "same.png"),
               str(tmp_path / "y" / "same.png"), "--out", str(tmp_path / "out")], cwd=tmp_path)
  assert done.returncode == 1 and "would both write the overlay same.png" in done.stderr

