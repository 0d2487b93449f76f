"""The exported inference program: written atomically, loaded without the model's code, same outputs as `infer`."""

import json
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from mrcnn_jax import checkpoint, export
from mrcnn_jax.data import transforms
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.predictor import Predictor

import tiny_model
from conftest import command_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
CANVAS, BATCH = 64, 2
OUTPUT_KEYS = ("boxes", "scores", "classes", "valid", "masks")
BASE_CONFIG = ROOT / "configs" / "mask_rcnn_R50_FPN_1x.py"
ENV = command_env()


# The tiny model as overrides of the base config: ResNet-18 at a quarter width on a 64 x 64 canvas, small enough to
# initialize, export and run in seconds.
OVERRIDES = tiny_model.overrides(CANVAS, 48)


def _tiny_config():
  return tiny_model.config(OVERRIDES)


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(BATCH, CANVAS, CANVAS, 3)).astype(np.float32)
  info = np.array([[CANVAS, CANVAS, 1, 1, CANVAS, CANVAS], [48, 64, 1, 1, 48, 64]], np.float32)
  return images, info


class _Model:
  def __init__(self, tmp):
    self.config = _tiny_config()
    self.variables = mask_rcnn.random_variables(self.config, 0)
    self.images, self.info = _inputs()
    self.reference = jax.device_get(mask_rcnn.build_infer(self.config)(self.variables, self.images, self.info))
    self.path = export.export_inference(self.config, self.variables, tmp / "export", batch_size=BATCH)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return _Model(tmp_path_factory.mktemp("export"))


def _assert_same(outputs, reference):
  for key in OUTPUT_KEYS:
    np.testing.assert_allclose(np.asarray(outputs[key]), np.asarray(reference[key]), rtol=1e-5, atol=1e-5,
                               err_msg=key)


# A fresh interpreter outside the checkout (the source tree's mrcnn_jax has no kernels/ subpackage), which loads the
# export, checks that no model code came with it, and saves the program's outputs.
_RUN_EXPORTED = """
import sys
import numpy as np
from mrcnn_jax.export import load_exported
fn = load_exported(sys.argv[1])
loaded = sorted(m for m in sys.modules if m.startswith("mrcnn_jax.modeling") or m.startswith("flax"))
assert not loaded, loaded
inputs = np.load(sys.argv[2])
out = fn(inputs["images"], inputs["image_info"])
np.savez(sys.argv[3], **{k: np.asarray(v) for k, v in out.items()})
"""


def test_loaded_program_runs_without_model_code_and_matches_infer(model, tmp_path):
  assert model.reference["valid"].any()  # random weights still give detections: the comparison means something
  np.savez(tmp_path / "inputs.npz", images=model.images, image_info=model.info)
  done = subprocess.run(
      [sys.executable, "-c", _RUN_EXPORTED, str(model.path), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
      cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  with np.load(tmp_path / "out.npz") as out:
    _assert_same(out, model.reference)
    assert set(out.files) >= set(OUTPUT_KEYS)


def test_command_line_exports_a_checkpoint(model, tmp_path):
  ckpt = checkpoint.save_variables(tmp_path / "ckpt", model.variables, config=model.config)
  done = subprocess.run(
      [sys.executable, "-m", "mrcnn_jax.export", f"--config={BASE_CONFIG}",
       *tiny_model.flags(OVERRIDES), f"--checkpoint={ckpt}", f"--out={tmp_path / 'cli'}",
       f"--batch_size={BATCH}", "--platforms=cpu,tpu"],
      cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  loaded = export.load_exported(tmp_path / "cli")
  assert loaded.platforms == ("cpu", "tpu") and loaded.batch_size == BATCH
  _assert_same(jax.device_get(loaded(model.images, model.info)), model.reference)


def test_export_directory_and_manifest(model):
  assert sorted(p.name for p in model.path.iterdir()) == sorted(
      [export.ARTIFACT_PATTERN.format(CANVAS, CANVAS), export.WEIGHTS_FILE, export.MANIFEST_FILE])
  assert not [p for p in model.path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
  manifest = json.loads((model.path / export.MANIFEST_FILE).read_text())
  assert manifest["batch_size"] == BATCH and manifest["canvases"] == [[CANVAS, CANVAS]]
  assert manifest["platforms"] == ["cpu"]
  assert manifest["inputs"] == {export.ARTIFACT_PATTERN.format(CANVAS, CANVAS): [
      {"name": "images", "shape": [BATCH, CANVAS, CANVAS, 3], "dtype": "float32"},
      {"name": "image_info", "shape": [BATCH, transforms.IMAGE_INFO_SIZE], "dtype": "float32"}]}
  assert manifest["outputs"]["boxes"] == {"shape": [BATCH, 10, 4], "dtype": "float32"}
  assert manifest["outputs"]["masks"] == {"shape": [BATCH, 10, 28, 28], "dtype": "float32"}
  assert manifest["config"]["model"]["backbone"]["depth"] == 18
  names = [w["name"] for w in manifest["weights"]]
  assert len(names) == len(jax.tree.leaves(model.variables)) and all(n.startswith(("params/", "batch_stats/"))
                                                                      for n in names)
  # Weights are arguments, not constants: the program is small next to the weights it runs on.
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.variables))
  assert (model.path / export.ARTIFACT_PATTERN.format(CANVAS, CANVAS)).stat().st_size < weight_bytes


def test_existing_directory_is_not_replaced_unless_asked(model, tmp_path):
  target = tmp_path / "target"
  target.mkdir()
  (target / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="overwrite"):
    export.export_inference(model.config, model.variables, target, batch_size=BATCH)
  assert (target / "keep.txt").exists()
  export.export_inference(model.config, model.variables, target, batch_size=BATCH, overwrite=True)
  assert not (target / "keep.txt").exists() and (target / export.MANIFEST_FILE).exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_multi_platform_export_runs_on_cpu(model, tmp_path):
  path = export.export_inference(model.config, model.variables, tmp_path / "multi", batch_size=BATCH,
                                 platforms=("cpu", "cuda", "tpu"))
  loaded = export.load_exported(path)
  assert loaded.platforms == ("cpu", "cuda", "tpu")
  _assert_same(jax.device_get(loaded(model.images, model.info)), model.reference)


def test_bad_inputs_and_platforms(model, tmp_path):
  loaded = export.load_exported(model.path)
  with pytest.raises(ValueError, match="images"):
    loaded(np.zeros((1, CANVAS, CANVAS, 3), np.float32), model.info)
  with pytest.raises(ValueError, match="image_info"):
    loaded(model.images, np.zeros((BATCH, 4), np.float32))
  with pytest.raises(ValueError, match="platforms"):
    export.export_inference(model.config, model.variables, tmp_path / "x", batch_size=1, platforms=("gpu3",))
  with pytest.raises(FileNotFoundError, match="manifest"):
    export.load_exported(tmp_path)


def test_predictor_over_the_loaded_program(model):
  loaded = export.load_exported(model.path)
  config = ml_collections.ConfigDict(loaded.manifest["config"])
  exported_predictor = Predictor(config, loaded.variables, infer_fn=loaded.infer, batch_size=loaded.batch_size)
  predictor = Predictor(model.config, model.variables, batch_size=BATCH)
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (64, 40, 3), dtype=np.uint8),
            rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]
  got, expected = exported_predictor(images), predictor(images)
  assert sum(len(r["scores"]) for r in expected) > 0
  for g, e in zip(got, expected):
    assert sorted(g) == sorted(e)
    for key in e:
      np.testing.assert_allclose(g[key], e[key], rtol=1e-5, atol=1e-5, err_msg=key)
