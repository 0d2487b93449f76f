"""`scripts/benchmark.py device --tiny`, the accelerator check's code paths at toy sizes on CPU, so that the command
meant for a GPU run does not rot: it runs end to end as a user types it, writes its JSON, the Pallas RoIAlign kernel
(in the interpreter) matches the XLA path, and a budget too small for any part skips every item with a note.

The tiny run took 120-153 s on the 2-core development machine while other jobs loaded it (load average 8-10;
75-80 s of CPU time, half of it the train step's compile); its budget is raised here so that a loaded machine
does not make it skip items.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # relative, the check's own PALLAS_TOLERANCE: both paths sum the same float32 products in order


def _env():
  """The test session's environment without its 8 fake CPU devices (conftest.py): the command as a user runs it."""
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def _run(tmp_path, *extra, timeout=900):
  out = tmp_path / "device.json"
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "device", "--tiny", "--json",
                         str(out), *extra], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["device.json"]  # written atomically: no temporary left
  return json.loads(out.read_text()), proc.stdout


def test_tiny_device_check_runs_every_part_and_pallas_matches_xla(tmp_path):
  report, stdout = _run(tmp_path, "--budget_s", "900")
  assert report["group"] == "device" and report["tiny"] is True and report["backend"] == "cpu"
  env = report["environment"]
  assert env["device_count"] == 1 and env["device_kind"] == "cpu"
  assert all(env[k] for k in ("jax", "jaxlib", "flax", "python"))
  assert report["skipped"] == [] and report["errors"] == [], (report["skipped"], report["errors"])
  assert {p: v["status"] for p, v in report["parts"].items()} == {"roi_align": "ok", "infer": "ok", "train": "ok"}

  # RoIAlign: both layouts and output sizes, each through XLA and the interpreted Triton kernel.
  rows = report["roi_align"]
  assert [(r["layout"], r["rois"], r["output"], r["impl"]) for r in rows] == [
      ("fpn", 4, 7, "xla"), ("fpn", 4, 7, "pallas_interpret_gpu"),
      ("single", 12, 14, "xla"), ("single", 12, 14, "pallas_interpret_gpu")]
  assert [len(r["features"]) for r in rows] == [4, 4, 1, 1]
  for r in rows:
    assert r["forward_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["forward_compile_s"] > 0 and r["fwd_bwd_compile_s"] > 0
    assert r["peak_bytes_in_use"] is None  # the CPU backend keeps no memory statistics: "n/a" in the table
  for r in rows[1::2]:
    for key in ("forward_max_abs_err", "forward_rel_err", "backward_max_abs_err", "backward_rel_err"):
      assert 0 <= r[key] <= TOLERANCE, (key, r[key])
  assert report["pallas_impl"] == "pallas_interpret_gpu" and report["pallas_ok"] is True

  # Inference: each dtype; the tiny config's 48x36 image goes to 64x48 on the 64x64 canvas, 10 detections each.
  infer = report["infer"]
  assert [(r["batch"], r["dtype"]) for r in infer] == [(1, "bfloat16"), (2, "float32")]
  for r in infer:
    assert (r["image_hw"], r["resized_hw"], r["canvas_hw"]) == ([36, 48], [48, 64], [64, 64])
    assert r["detections_per_image"] == [10] * r["batch"]
    assert r["images_per_s"] > 0 and r["compile_s"] > 0 and r["program_peak_bytes"] > 0

  # The bfloat16 train step at batch 8, a finite loss; the GPU target is not judged on a tiny CPU run.
  (step,) = report["train"]
  assert (step["batch"], step["dtype"], step["canvas_hw"]) == (8, "bfloat16", [64, 64])
  assert step["finite"] and step["total_loss"] > 0 and step["images_per_s"] > 0
  assert step["target_images_per_s"] == 60 and step["meets_target"] is None

  # One table: the header lines, then a row per figure (RoIAlign's forward and fwd+bwd apart).
  assert len(report["rows"]) == 2 * len(rows) + len(infer) + 1
  assert "device check (--tiny): cpu" in stdout and "Pallas RoIAlign (pallas_interpret_gpu) vs XLA: within" in stdout
  assert "target >= 60 images/s per H100-class GPU" in stdout
  for r in report["rows"]:
    assert r["name"] in stdout


def test_a_budget_too_small_for_any_part_skips_every_item_with_a_note(tmp_path):
  report, stdout = _run(tmp_path, "--budget_s", "0.5", timeout=120)
  assert report["roi_align"] == report["infer"] == report["train"] == [] and report["errors"] == []
  assert {p: v["status"].split(":")[0] for p, v in report["parts"].items()} == dict.fromkeys(
      ("roi_align", "infer", "train"), "not started")
  assert [(s["part"], s["item"]) for s in report["skipped"]] == [
      ("roi_align", "fpn 4 RoIs 7x7"), ("roi_align", "single 12 RoIs 14x14"), ("infer", "batch 1 bfloat16"),
      ("infer", "batch 2 float32"), ("train", "batch 8 bfloat16")]
  assert all(s["reason"].startswith("not run (not started") for s in report["skipped"])
  assert report["pallas_ok"] is None and "not measured" in stdout
