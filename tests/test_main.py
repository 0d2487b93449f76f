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
