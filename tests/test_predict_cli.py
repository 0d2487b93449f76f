"""`python -m mrcnn_jax.predict`: overlays and predictions.json from a checkpoint, the same detections as the Predictor.

Runs the command in a fresh interpreter outside the checkout (the source tree's mrcnn_jax has no kernels/ subpackage)
on a tiny random-init model (ResNet-18 at a quarter width, 64 x 64 canvas): random weights still give detections,
enough to check that what the command writes is what the Predictor returns.
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from mrcnn_jax import checkpoint, config_files
from mrcnn_jax.data import coco, shapes
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.predictor import Predictor

import tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "mask_rcnn_R50_FPN_1x.py"
CANVAS = 64
# The tiny model as command-line overrides of the base config, applied alike in this process and in the command.
OVERRIDES = tiny_model.overrides(CANVAS, 48, **tiny_model.UNIT_PIXEL_STD_KW)
IMAGE_SIZES = {"a.png": (48, 64), "b.jpg": (64, 40), "c.png": (30, 30)}
# Random weights score these images' detections 0.45..0.64: the threshold keeps some of them.
SCORE_THRESHOLD = 0.5


def _tiny_config():
  return tiny_model.config(OVERRIDES)


def _run(args, cwd):
  return subprocess.run(
      [sys.executable, "-m", "mrcnn_jax.predict", f"--config={BASE_CONFIG}",
       *tiny_model.flags(OVERRIDES), *args],
      cwd=cwd, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=300,
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
  config = _tiny_config()
  variables = jax.device_get(mask_rcnn.init_variables(config, jax.random.key(0), (CANVAS, CANVAS)))
  path = checkpoint.save_variables(tmp_path_factory.mktemp("ckpt") / "tiny", variables, config=config)
  return config, variables, path


def test_overlays_and_json_match_the_predictor(tiny_checkpoint, tmp_path):
  config, variables, ckpt = tiny_checkpoint
  paths = _write_images(tmp_path / "in")
  out = tmp_path / "out"
  # One path after --images, the rest as following arguments, as a shell glob gives them.
  done = _run(["--checkpoint", str(ckpt), "--images", *map(str, paths), "--out", str(out),
               f"--score_threshold={SCORE_THRESHOLD}", "--batch_size=2"], cwd=tmp_path)
  assert done.returncode == 0, done.stderr

  assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "predictions.json"]
  predictions = json.loads((out / "predictions.json").read_text())
  assert predictions["class_names"] == ["background", *shapes.CLASSES]
  assert list(predictions["images"]) == [str(p) for p in paths]

  expected = Predictor(config, variables, batch_size=2)([coco.read_image(p) for p in paths])
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
    np.testing.assert_allclose(np.reshape([i["box"] for i in instances], (-1, 4)), result["boxes"], atol=1e-4)
    for instance, mask in zip(instances, result["masks"]):
      assert instance["segmentation"]["size"] == [h, w]
      np.testing.assert_array_equal(mask_util.decode(instance["segmentation"]).astype(bool), mask)

    overlay = np.asarray(Image.open(out / entry["overlay"]))
    assert overlay.shape == (h, w, 3) and overlay.dtype == np.uint8
    if instances:
      assert (overlay != coco.read_image(path)).any()
    elif path.suffix == ".png":
      np.testing.assert_array_equal(overlay, coco.read_image(path))  # nothing to draw: the image as it was


def test_a_missing_or_corrupt_image_is_named_before_the_model_loads(tmp_path):
  good = _write_images(tmp_path / "in")[0]
  corrupt = tmp_path / "in" / "corrupt.jpg"
  corrupt.write_bytes(b"not an image at all")
  missing = tmp_path / "in" / "missing.png"
  # The checkpoint does not exist either: the failure must be about the image, found before any weights load.
  for bad in (missing, corrupt):
    done = _run(["--checkpoint", str(tmp_path / "no_checkpoint"), "--images", str(good), str(bad),
                 "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert done.returncode != 0
    assert str(bad) in done.stderr and "no_checkpoint" not in done.stderr
    assert not (tmp_path / "out").exists()
  # Good images and no checkpoint: the checkpoint is named, and no output directory is left behind.
  done = _run(["--checkpoint", str(tmp_path / "no_checkpoint"), "--images", str(good), "--out", str(tmp_path / "out")],
              cwd=tmp_path)
  assert done.returncode != 0 and "no_checkpoint" in done.stderr
  assert not (tmp_path / "out").exists()


def test_overlay_names_must_not_collide(tmp_path):
  (tmp_path / "x").mkdir()
  (tmp_path / "y").mkdir()
  for d in ("x", "y"):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / d / "same.png")
  done = _run(["--checkpoint", str(tmp_path), "--images", str(tmp_path / "x" / "same.png"),
               str(tmp_path / "y" / "same.png"), "--out", str(tmp_path / "out")], cwd=tmp_path)
  assert done.returncode != 0 and "same.png" in done.stderr

