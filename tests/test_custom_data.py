"""A user's own COCO-format dataset, end to end: `main --config=configs/custom_coco.py` with nothing but the four
dataset paths (and a short schedule), then `predict` with no --config.

The set is written by the test (mrcnn_jax.data.nuclei: one category, id 7, "nucleus"; up to 12 instances per tile,
more than the shapes config's 8 slots), so the run must derive the class count and names, the instance slots, the
scale and canvas from the annotations, and the predictions must carry the category's name.
"""

import json
import pathlib
import subprocess
import sys

import pytest
from conftest import command_env

from mrcnn_jax import config_files, config_from_data
from mrcnn_jax.data import nuclei

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "custom_coco.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return nuclei.write_nuclei(tmp_path_factory.mktemp("data") / "nuclei", num_train=6, num_val=2, seed=1, size=64,
                             max_instances=12)


def _config(data, **overrides):
  config = config_files.load_config(str(CONFIG))
  for key, value in {**{f"dataset.{k}": str(v) for k, v in data.items()}, **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_fields_left_unset_follow_the_data(data):
  summary = config_from_data.summarize(data["train_json"])
  config = _config(data)
  lines = config_from_data.derive(config)
  assert config.model.num_classes == 1 and config.model.class_names == ("nucleus",)
  assert config.input.max_instances == max(summary.instances) > 8
  assert config.input.min_size_test == 64 and config.input.canvases == ((64, 64),)
  assert config.train.max_iter == config_from_data.MIN_ITERS  # 8 epochs of 6 tiles are far fewer steps
  assert config.train.steps == (int(0.75 * config.train.max_iter), int(0.92 * config.train.max_iter))
  assert any("nucleus" in line for line in lines) and any("max_instances" in line for line in lines)


def test_fields_set_by_the_user_are_kept(data):
  config = _config(data, **{"model.num_classes": 1, "train.max_iter": 40, "input.canvases": ((96, 96),)})
  lines = config_from_data.derive(config)
  assert config.train.max_iter == 40 and config.input.canvases == ((96, 96),)
  assert not any(line.startswith("train.max_iter") or line.startswith("input.canvases") for line in lines)


def test_unset_fields_without_a_dataset_name_the_field():
  config = config_files.load_config(str(CONFIG))
  with pytest.raises(ValueError, match=r"config.model.num_classes is derived from the dataset.*train_json"):
    config_from_data.derive(config)


def test_the_custom_data_command_trains_evaluates_and_predicts_with_names(data, tmp_path):
  workdir = tmp_path / "run"
  paths = [f"--config.dataset.{k}={v}" for k, v in data.items()]
  short = ["--config.train.max_iter=4", "--config.train.log_every=2"]
  done = subprocess.run([sys.executable, "-m", "mrcnn_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
                         *paths, *short], cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
                        env=command_env())
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  assert "from the data: model.num_classes=1" in out and "nucleus" in out
  assert "from the data: input.max_instances=" in out
  assert "Evaluation results for segm:" in out and "Per-category segm AP:" in out
  assert (workdir / "predictions.png").is_file()
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())["metrics"]
  assert "segm/AP" in metrics and "bbox/AP-nucleus" in metrics

  out_dir = tmp_path / "pred"
  done = subprocess.run([sys.executable, "-m", "mrcnn_jax.predict", f"--checkpoint={workdir}",
                         f"--images={data['val_image_dir']}", f"--out={out_dir}", "--score_threshold=0"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False, env=command_env())
  assert done.returncode == 0, done.stderr[-3000:]
  predictions = json.loads((out_dir / "predictions.json").read_text())
  assert predictions["class_names"][1:] == ["nucleus"]
  instances = [i for image in predictions["images"].values() for i in image["instances"]]
  assert instances and {i["name"] for i in instances} == {"nucleus"}
  assert len(list(out_dir.glob("*.png"))) == 2
