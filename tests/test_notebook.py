"""notebooks/eval.ipynb, executed end to end with nbclient on a tiny random-init checkpoint and a tiny shapes set.

The kernel is the Python running the tests: a "python3" kernelspec written into the test's folder (found first through
JUPYTER_PATH) runs `sys.executable -m ipykernel_launcher`, so neither an activated venv, nor PATH, nor a kernelspec
installed elsewhere (a user's ~/.local/share/jupyter/kernels/python3 pointing at another Python) decides which
interpreter runs the notebook. It starts in the test's folder, never the repository root, whose mrcnn_jax would shadow
the installed package (the source tree has no kernels/ subpackage).

nbclient, nbformat and ipykernel are dev dependencies: when they are missing these tests fail, they do not skip.
"""

import ast
import json
import os
import pathlib
import sys

import jax
import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager

from mrcnn_jax import checkpoint
from mrcnn_jax.data import shapes
from mrcnn_jax.modeling import mask_rcnn

import tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "eval.ipynb"
BASE_CONFIG = ROOT / "configs" / "mask_rcnn_R50_FPN_1x.py"
CANVAS = 64
# A tiny model (ResNet-18 at a quarter width, 64 x 64 canvas): random weights, so the scores mean nothing, but every
# step of the notebook runs, and it compiles in seconds on a CPU.
OVERRIDES = tiny_model.overrides(CANVAS, 64, **tiny_model.UNIT_PIXEL_STD_KW, dataset__name="shapes")


def _tiny_config():
  return tiny_model.config(OVERRIDES)


def _write_kernelspec(jupyter_dir: pathlib.Path) -> None:
  """A "python3" kernelspec that runs this interpreter on the CPU with one device (the test session's 8 forced CPU
  devices, conftest.py, would only make the kernel slower)."""
  xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                       if not f.startswith("--xla_force_host_platform_device_count"))
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (test)",
      "language": "python",
      "env": {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags},
  }
  kernel_dir = jupyter_dir / "kernels" / "python3"
  kernel_dir.mkdir(parents=True)
  (kernel_dir / "kernel.json").write_text(json.dumps(spec, indent=1))


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  return cells[0]


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_committed_notebook_is_valid_and_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"
  source = _parameters_cell(nb).source
  for name in ("CHECKPOINT", "CONFIG", "DATA_JSON", "IMAGE_DIR", "NUM_IMAGES"):
    assert f"{name} =" in source


def test_eval_notebook_runs_end_to_end(tmp_path, monkeypatch):
  config = _tiny_config()
  variables = mask_rcnn.random_variables(config, 0)
  ckpt = checkpoint.save_variables(tmp_path / "ckpt", variables, config=config)
  data = shapes.write_dataset(tmp_path / "shapes_data", num_train=0, num_val=4, seed=0)

  _write_kernelspec(tmp_path / "jupyter")
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable

  nb = nbformat.read(NOTEBOOK, as_version=4)
  _parameters_cell(nb).source = "\n".join([
      f"CHECKPOINT = {str(ckpt)!r}",
      "CONFIG = None",  # the config saved with the checkpoint
      f"DATA_JSON = {str(data['val_annotations'])!r}",
      f"IMAGE_DIR = {str(data['val_images'])!r}",
      "NUM_IMAGES = 3",
      "SCORE_THRESHOLD = 0.0",
  ])
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
  (draw_cell,) = [c for c in nb.cells if "visualize.draw_instances" in c.source]
  counts = ast.literal_eval(_text(draw_cell).split("detections drawn per image:")[1].strip())
  assert len(counts) == 3 and sum(counts) > 0, counts  # the overlays show something
  (eval_cell,) = [c for c in nb.cells if "coco_eval.format_table" in c.source]
  table = _text(eval_cell)
  for header in ("Evaluation results for bbox:", "Evaluation results for segm:", "AP50", "APl"):
    assert header in table, table
