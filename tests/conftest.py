"""Test session setup: 8 CPU devices and exact float32 matmuls, set before JAX initializes its backends."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from mrcnn_jax import config_files  # noqa: E402

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg=None):
  """get_config(arg) of configs/<name>.py, loaded by path as the entry points load it."""
  return config_files.load_config(str(CONFIG_DIR / f"{name}.py") + ("" if arg is None else f":{arg}"))


@pytest.fixture(name="load_config")
def _load_config_fixture():
  return load_config
