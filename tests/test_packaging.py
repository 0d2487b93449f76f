"""The top-level kernels/ folder ships as `mrcnn_jax.kernels`, in a wheel and in an editable install.

Both wheels are built with setuptools' PEP 517/660 hooks (what pip calls) and installed by unpacking, in
subprocesses whose working directory is outside the checkout, so nothing resolves through the source tree by accident.
"""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("setuptools", reason="building the wheels needs setuptools (in the `dev` extra)")


def _build(hook: str, source: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  code = f"import sys, setuptools.build_meta as b; print(b.{hook}(sys.argv[1]))"
  done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True, check=True)
  return out / done.stdout.strip().splitlines()[-1]


def _unpack(wheel: pathlib.Path, dest: pathlib.Path) -> list[str]:
  with zipfile.ZipFile(wheel) as zf:
    zf.extractall(dest)
    return zf.namelist()


def test_wheel_ships_kernels_inside_the_package(tmp_path):
  # Built from a copy: the hook writes build/ and *.egg-info beside pyproject.toml.
  source = tmp_path / "src"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source)
  for name in ("mrcnn_jax", "kernels"):
    shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
  wheel = _build("build_wheel", source, tmp_path / "dist")
  names = _unpack(wheel, tmp_path / "site")
  assert "mrcnn_jax/kernels/__init__.py" in names
  assert "mrcnn_jax/kernels/roi_align.py" in names and "mrcnn_jax/kernels/tuning.py" in names
  assert not any(n.startswith("kernels/") for n in names), "kernels/ must not install as a top-level package"
  code = "import mrcnn_jax.kernels.roi_align as k, mrcnn_jax.ops.roi_align as r; print(k.__file__); print(r.__file__)"
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                       env={"PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"})
  kernel_file, ops_file = out.stdout.split()
  assert pathlib.Path(kernel_file) == tmp_path / "site" / "mrcnn_jax" / "kernels" / "roi_align.py"
  assert pathlib.Path(ops_file).is_relative_to(tmp_path / "site")


def test_editable_install_maps_kernels_to_the_source_folder(tmp_path):
  wheel = _build("build_editable", ROOT, tmp_path / "dist")
  _unpack(wheel, tmp_path / "site")
  # -S: no site-packages, so only the editable install can resolve the package; -c from tmp_path keeps the checkout
  # off sys.path.
  code = ("import site, sys, importlib.util as u; site.addsitedir(sys.argv[1]); "
          "print(u.find_spec('mrcnn_jax.kernels.roi_align').origin)")
  out = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "site")], cwd=tmp_path,
                       capture_output=True, text=True, check=True)
  assert pathlib.Path(out.stdout.strip()) == ROOT / "kernels" / "roi_align.py"
