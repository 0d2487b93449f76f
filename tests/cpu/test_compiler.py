"""`cpu.compiler.inference_options`: which XLA:CPU compiler options the inference programs get, that XLA takes them
(seen in the compiled program: no YNNPACK fusions), that the Predictor's program carries them, and what happens
without them (the switch off, another backend, a jaxlib that refuses the option)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import cpu
from mrcnn_jax.cpu import compiler

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiler options")

_YNN = "__ynn_fusion"


def _conv_and_dot(x, k):
  y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.einsum("nhwc,cd->nhwd", y, k[1, 1])


_ARGS = (np.ones((1, 8, 8, 16), np.float32), np.ones((3, 3, 16, 16), np.float32))


def _compiled_text(fn, *args):
  return fn.lower(*args).compile().as_text()


def test_options_on_cpu(monkeypatch):
  monkeypatch.delenv(cpu.ENV_VAR, raising=False)
  assert compiler.inference_options() == compiler.CPU_INFERENCE_OPTIONS


def test_the_options_take_the_dots_and_convolutions_from_ynnpack():
  """Without the options jaxlib 0.10's XLA:CPU runs the convolution and the dot as YNNPACK fusions; with them, as
  its own ops, and the values agree to float32 rounding."""
  default = jax.jit(_conv_and_dot)
  with_options = jax.jit(_conv_and_dot, compiler_options=compiler.CPU_INFERENCE_OPTIONS)
  assert _YNN in _compiled_text(default, *_ARGS), "XLA:CPU no longer uses YNNPACK by default: is the option moot?"
  text = _compiled_text(with_options, *_ARGS)
  assert _YNN not in text
  assert "convolution(" in text and "dot(" in text
  np.testing.assert_allclose(with_options(*_ARGS), default(*_ARGS), rtol=1e-6)


def test_the_switch_off_drops_them(monkeypatch):
  monkeypatch.setenv(cpu.ENV_VAR, "0")
  assert compiler.inference_options() == {}


def test_other_backends_get_none(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert compiler.inference_options() == {}


def test_a_refused_option_is_dropped_with_a_warning(monkeypatch, caplog):
  monkeypatch.setattr(compiler, "CPU_INFERENCE_OPTIONS", {"xla_cpu_no_such_option": ""})
  with caplog.at_level(logging.WARNING):
    assert compiler.inference_options() == {}
  assert "xla_cpu_no_such_option" in caplog.text


def test_the_predictors_program_carries_them():
  """The Predictor jits its infer_fn as the top-level program with the options: its compiled program has no
  YNNPACK fusion where the same function jitted plainly has."""
  from test_predict import make_config  # pylint: disable=import-outside-toplevel  # tests/, on sys.path
  from mrcnn_jax.predictor import Predictor  # pylint: disable=import-outside-toplevel

  def infer_fn(variables, images, image_info):
    del image_info
    return _conv_and_dot(images, variables["kernel"])

  variables = {"kernel": np.ones((3, 3, 3, 3), np.float32)}
  predictor = Predictor(make_config(), variables, infer_fn=infer_fn)
  args = (variables, np.ones((1, 8, 8, 3), np.float32), np.ones((1, 6), np.float32))
  assert _YNN in _compiled_text(jax.jit(infer_fn), *args)
  assert _YNN not in _compiled_text(predictor.program, *args)
