"""The training entry point: a misspelt override, a missing dataset or the shapes config given a user's own data
fails in one line naming it; SIGTERM saves, stops without evaluating and exits 143; the main job runs end to end;
no run leaks the input pipeline's shared memory."""

import pathlib
import signal
import subprocess
import sys
import time

import own_data
import tiny_model
from conftest import command_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "mask_rcnn_R50_FPN_1x.py"
LEAK = "leaked shared_memory"


def _run(*args, tmp_path):
  return subprocess.run([sys.executable, "-m", "mrcnn_jax.main", *args], cwd=tmp_path, capture_output=True,
                        text=True, env=command_env(), timeout=300)


def test_misspelt_override_fails(tmp_path):
  done = _run(f"--config={ROOT}/configs/mask_rcnn_R50_FPN_1x.py", f"--workdir={tmp_path}/w",
              "--config.train.max_iterr=10", tmp_path=tmp_path)
  assert done.returncode != 0
  assert "max_iterr" in done.stderr


def test_missing_dataset_is_named(tmp_path):
  done = _run(f"--config={ROOT}/configs/mask_rcnn_R50_FPN_1x.py", f"--workdir={tmp_path}/w", tmp_path=tmp_path)
  assert done.returncode == 1
  assert "mrcnn_jax.main: error: config.dataset.train_json" in done.stderr and "Traceback" not in done.stderr


def test_the_shapes_config_refuses_a_users_own_data(tmp_path):
  """It would train on its synthetic set and ignore the files named; the error names them and the config to use."""
  paths = own_data.write(tmp_path / "data", train_counts=(2,), val_counts=(2,))
  done = _run(f"--config={ROOT}/configs/shapes.py", f"--workdir={tmp_path}/w",
              f"--config.dataset.train_json={paths['train_json']}", f"--config.dataset.val_json={paths['val_json']}",
              tmp_path=tmp_path)
  errors = [line for line in done.stderr.splitlines() if "error:" in line]
  assert done.returncode == 1 and len(errors) == 1, done.stderr
  assert "config.dataset.train_json, config.dataset.val_json given with a config whose dataset.name is 'shapes'" \
      in errors[0]
  assert "--config=configs/custom_coco.py" in errors[0]
  assert not (tmp_path / "w" / "shapes_data").exists()  # refused before the set is generated


def test_sigterm_saves_stops_without_evaluating_and_exits_143(tmp_path):
  """A run with a val set and a loader worker process: SIGTERM after the first logged step. The step reached is
  saved, there is no final evaluation (no eval/, no predictions.png), the stop line says how to resume, the exit
  status is 143, and the worker's shared memory is released."""
  paths = own_data.write(tmp_path / "data", train_counts=(3, 5, 2, 4, 1, 6, 2, 3), val_counts=(2, 3))
  values = {**tiny_model.TRAIN, "model.num_classes": 1, "model.class_names": (), "train.max_iter": 1000,
            "train.checkpoint_every": 1000, "train.eval_every": 500, "train.num_workers": 1,
            **own_data.dataset_overrides(paths)}
  workdir = tmp_path / "w"
  with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a pipe left unread could fill and block the run
    process = subprocess.Popen([sys.executable, "-m", "mrcnn_jax.main", f"--config={BASE_CONFIG}",
                                f"--workdir={workdir}", *tiny_model.flags(values)], cwd=tmp_path, stderr=stderr,
                               stdout=subprocess.DEVNULL, env=command_env())
    try:
      deadline = time.monotonic() + 600
      while not ((workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().strip()):
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "no step was logged"
        time.sleep(0.5)
      process.send_signal(signal.SIGTERM)
      returncode = process.wait(timeout=300)
    finally:
      process.kill()
  log = (tmp_path / "stderr.txt").read_text()
  assert returncode == 143, log[-3000:]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 1 <= saved[0] < 1000
  assert f"stopped at step {saved[0]} of 1000; rerun the same command to resume" in log
  assert not (workdir / "eval").exists() and not (workdir / "predictions.png").exists()
  assert "Traceback" not in log and LEAK not in log
  # The config saved with the checkpoint names the set's category (predict and evaluate label with it).
  from mrcnn_jax import checkpoint  # pylint: disable=import-outside-toplevel

  assert checkpoint.load_saved_config(workdir)["model"]["class_names"] == [own_data.CATEGORY_NAME]


def test_main_job_runs_end_to_end_on_shapes(tmp_path):
  """The README's main job at smoke size: generates the set, trains, evaluates, prints the AP table, saves the
  checkpoint and the predictions picture."""
  import json

  from PIL import Image

  workdir = tmp_path / "w"
  done = _run(f"--config={ROOT}/configs/shapes.py:runlocal", f"--workdir={workdir}", tmp_path=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert LEAK not in done.stderr  # the shapes config trains with a loader worker process
  assert "Evaluation results for bbox" in done.stdout and "Evaluation results for segm" in done.stdout
  assert "| category" in done.stdout  # the per-category table
  manifest = json.loads((workdir / "shapes_data" / "manifest.json").read_text())
  assert manifest["num_train"] == 32 and manifest["num_val"] == 8
  written = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert written["num_images"] == 8
  assert {"bbox/AP", "bbox/AP50", "segm/AP", "segm/AP75", "bbox/AP-circle"} <= set(written["metrics"])
  assert (workdir / "eval" / "coco_instances_results.json").exists()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]
  with Image.open(workdir / "predictions.png") as image:
    # 8 val images of 128 x 128, enlarged 2x, in a 4-column grid with padding.
    assert 4 * 256 < image.size[0] < 4 * 256 + 20 and 2 * 256 < image.size[1] < 2 * 256 + 20
  # The metrics of the run's steps and of the evaluation are logged as JSON lines.
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["iteration"] for line in lines if "total_loss" in line] == list(range(1, 11))
