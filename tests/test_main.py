"""The training entry point's flags: a misspelt override or a missing dataset fails with a message naming it."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, tmp_path):
  return subprocess.run([sys.executable, "-m", "mrcnn_jax.main", *args], cwd=tmp_path, capture_output=True,
                        text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_misspelt_override_fails(tmp_path):
  done = _run(f"--config={ROOT}/configs/mask_rcnn_R50_FPN_1x.py", f"--workdir={tmp_path}/w",
              "--config.train.max_iterr=10", tmp_path=tmp_path)
  assert done.returncode != 0
  assert "max_iterr" in done.stderr


def test_missing_dataset_is_named(tmp_path):
  done = _run(f"--config={ROOT}/configs/mask_rcnn_R50_FPN_1x.py", f"--workdir={tmp_path}/w", tmp_path=tmp_path)
  assert done.returncode != 0
  assert "config.dataset.train_json" in done.stderr


def test_main_job_runs_end_to_end_on_shapes(tmp_path):
  """The README's main job at smoke size: generates the set, trains, evaluates, prints the AP table, saves the
  checkpoint and the predictions picture."""
  import json

  from PIL import Image

  workdir = tmp_path / "w"
  done = _run(f"--config={ROOT}/configs/shapes.py:runlocal", f"--workdir={workdir}", tmp_path=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
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
