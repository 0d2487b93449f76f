"""Test session setup: 8 CPU devices, exact float32 matmuls and one cache of compiled programs, set before JAX
initializes its backends."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, one per test session (the pytest process creates it, its xdist workers and the
# commands the tests start inherit it, `pytest_unconfigure` removes it): a program that several tests compile (the
# tiny model's train step, run again to resume or to compare) compiles once per session. Every test still runs its
# programs; a cold session compiles each of them once.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mrcnn_jax_tests_xla_")
XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from mrcnn_jax import config_files  # noqa: E402

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def command_env(**extra) -> dict:
  """The environment of a command a test starts: only what it needs (the CPU platform, PATH) and the session's
  compilation cache."""
  return {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "JAX_COMPILATION_CACHE_DIR": XLA_CACHE, **extra}


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the pytest process, not an xdist worker
    shutil.rmtree(XLA_CACHE, ignore_errors=True)


def load_config(name: str, arg=None):
  """get_config(arg) of configs/<name>.py, loaded by path as the entry points load it."""
  return config_files.load_config(str(CONFIG_DIR / f"{name}.py") + ("" if arg is None else f":{arg}"))


@pytest.fixture(name="load_config")
def _load_config_fixture():
  return load_config
