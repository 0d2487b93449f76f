"""Test session setup: 8 CPU devices and exact float32 matmuls, set before JAX initializes its backends."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg=None):
  """get_config(arg) of configs/<name>.py, loaded by path as the entry points load it."""
  spec = importlib.util.spec_from_file_location(f"_test_config_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.fixture(name="load_config")
def _load_config_fixture():
  return load_config
