"""Loading `ml_collections` config files by path (`configs/FILE.py` or `configs/FILE.py:arg`); a config as JSON.

The entry points read configs through `ml_collections.config_flags`, which loads the file by path; scripts, tests and
notebooks use `load_config` here to get the same object. A config variant loads its base with `load_sibling`, so it
works however the file itself was loaded (by path or as `configs.FILE`).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import types


def _load_module(path: pathlib.Path) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(f"_mrcnn_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sibling(this_file: str, name: str) -> types.ModuleType:
  """The config module `name` (without .py) from the folder of `this_file` (pass `__file__`)."""
  path = pathlib.Path(this_file).resolve().parent / f"{name}.py"
  if not path.is_file():
    raise FileNotFoundError(f"no config file {path}")
  return _load_module(path)


def load_config(spec: str, *, search_root: str | pathlib.Path | None = None):
  """`get_config([arg])` of the config file `spec` = "path.py" or "path.py:arg".

  A relative path that does not exist from the working directory is looked up under `search_root` (e.g. the
  repository root) when given.
  """
  path, sep, arg = str(spec).partition(":")
  file = pathlib.Path(path)
  if not file.exists() and not file.is_absolute() and search_root is not None:
    file = pathlib.Path(search_root) / file
  if not file.is_file():
    raise FileNotFoundError(f"no such config file: {path}")
  module = _load_module(file)
  return module.get_config(arg) if sep else module.get_config()


def config_json(config) -> str:
  """A ConfigDict (or a plain mapping) as JSON text; values JSON cannot hold are written as their best effort."""
  if hasattr(config, "to_json_best_effort"):
    return config.to_json_best_effort(indent=2)
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.dumps(config, indent=2, default=repr)
