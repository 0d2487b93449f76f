"""The one switch, MRCNN_JAX_CPU_KERNELS: what it accepts, and that it switches, seen in the compiled CPU programs
(which ops XLA runs), not in the values (those agree both ways; tests/modeling/test_layers.py)."""

import jax
import numpy as np
import pytest

from mrcnn_jax import cpu
from mrcnn_jax.cpu import conv


@pytest.mark.parametrize("value,enabled", [(None, True), ("1", True), ("0", False), (" 0 ", False)])
def test_kernels_enabled_reads_the_environment(value, enabled, monkeypatch):
  if value is None:
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
  else:
    monkeypatch.setenv(cpu.ENV_VAR, value)
  assert cpu.kernels_enabled() is enabled


@pytest.mark.parametrize("value", ["off", "false", "2", ""])
def test_other_values_are_refused(value, monkeypatch):
  monkeypatch.setenv(cpu.ENV_VAR, value)
  with pytest.raises(ValueError, match=cpu.ENV_VAR):
    cpu.kernels_enabled()


def _value_and_grads(fn):
  def run(x, k):
    y, vjp = jax.vjp(fn, x, k)
    return y, *vjp(y)
  return jax.jit(run)


_F32 = np.float32
# name -> (op, x shape, kernel shape, convolution ops XLA:CPU runs for value and both gradients with the CPU kernels
# on, and off). On: a small 3x3 layer keeps XLA's forward convolution and its input gradient written as one, its
# kernel gradient is per-tap matmuls; a large one is Winograd's matmuls throughout; a transposed convolution is one
# matmul. Off: XLA's convolution and its autodiff, three convolutions each.
_PROGRAMS = {
    "conv2d 3x3, small": (lambda x, k: conv.conv2d(x, k, 1, 1), (2, 8, 8, 5), (3, 3, 5, 4), 2, 3),
    "conv2d 3x3, Winograd": (lambda x, k: conv.conv2d(x, k, 1, 1), (2, 32, 33, 128), (3, 3, 128, 128), 0, 3),
    "conv2d 3x3, stride 2": (lambda x, k: conv.conv2d(x, k, 2, 1), (2, 8, 8, 5), (3, 3, 5, 4), 2, 3),
    "conv_transpose 2x2, stride 2": (lambda x, k: conv.conv_transpose(x, k, 2, 0), (2, 8, 8, 5), (2, 2, 5, 4), 0, 3),
}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA:CPU's compiled program")
@pytest.mark.parametrize("name", list(_PROGRAMS))
@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
def test_switch_decides_the_compiled_cpu_program(name, enabled, monkeypatch):
  monkeypatch.setenv(cpu.ENV_VAR, "1" if enabled else "0")
  fn, x_shape, k_shape, convolutions_on, convolutions_off = _PROGRAMS[name]
  x, k = np.ones(x_shape, _F32), np.ones(k_shape, _F32)
  lowered = _value_and_grads(fn).lower(x, k)
  compiled = lowered.compile().as_text()
  assert compiled.count(" convolution(") == (convolutions_on if enabled else convolutions_off)
  if name.startswith("conv2d"):
    # The saved input kept in memory for the gradients (`conv._materialize_on_cpu`): a barrier XLA removes once it
    # has served, so it shows in the lowered program only.
    assert ("optimization_barrier" in lowered.as_text()) is enabled


@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
def test_switch_decides_the_pointwise_gradient(enabled, monkeypatch):
  """`pointwise` is a dot either way; on, its kernel gradient transposes dy from memory behind a barrier."""
  monkeypatch.setenv(cpu.ENV_VAR, "1" if enabled else "0")
  lowered = _value_and_grads(conv.pointwise).lower(np.ones((2, 8, 8, 5), _F32), np.ones((5, 4), _F32))
  assert ("optimization_barrier" in lowered.as_text()) is enabled
