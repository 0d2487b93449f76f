"""The convolution layers against torch, values and gradients, with the CPU kernels on (`mrcnn_jax.cpu`, the
default) and off (XLA's ops: MRCNN_JAX_CPU_KERNELS=0). The ops' own tests are in tests/cpu."""

import jax
import numpy as np
import pytest

from mrcnn_jax import cpu
from mrcnn_jax.convert import common
from mrcnn_jax.modeling import layers

torch = pytest.importorskip("torch", reason="torch is the oracle; install the `parity` extra")


@pytest.fixture(name="cpu_kernels", params=[True, False], ids=["cpu_kernels", "xla"])
def _cpu_kernels(request, monkeypatch):
  """Each test runs with the CPU kernels on and off, through the documented switch."""
  monkeypatch.setenv(cpu.ENV_VAR, "1" if request.param else "0")
  return request.param


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 1), (3, 2, 1), (3, 1, 1), (5, 3, 2)])
def test_conv_transpose_matches_torch(kernel, stride, padding, cpu_kernels):
  rng = np.random.default_rng(kernel * 100 + stride * 10 + padding)
  x = rng.normal(size=(2, 5, 7, 6)).astype(np.float32)
  weight = rng.normal(size=(6, 4, kernel, kernel)).astype(np.float32)  # torch (in, out, kh, kw)
  bias = rng.normal(size=(4,)).astype(np.float32)
  cotangent_shape = (2, (5 - 1) * stride + kernel - 2 * padding, (7 - 1) * stride + kernel - 2 * padding, 4)
  cot = rng.normal(size=cotangent_shape).astype(np.float32)

  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  tw = torch.tensor(weight, requires_grad=True)
  tb = torch.tensor(bias, requires_grad=True)
  ty = torch.nn.functional.conv_transpose2d(tx, tw, tb, stride=stride, padding=padding)
  ty.backward(torch.tensor(cot.transpose(0, 3, 1, 2)))

  module = layers.conv_transpose(4, kernel, stride, padding, name="deconv")
  params = {"params": {"kernel": common.deconv_kernel(weight), "bias": bias}}

  def f(p, x):
    return module.apply(p, x)

  y, vjp = jax.vjp(f, params, x)
  dparams, dx = vjp(cot)
  np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-5)
  # The stored kernel is the torch weight flipped: its gradient is torch's, converted the same way.
  np.testing.assert_allclose(dparams["params"]["kernel"], common.deconv_kernel(tw.grad.numpy()), atol=1e-4,
                             rtol=1e-5)
  np.testing.assert_allclose(dparams["params"]["bias"], tb.grad.numpy(), atol=1e-4, rtol=1e-5)


def test_conv_transpose_params_keep_flax_layout():
  """Checkpoints written with flax's nn.ConvTranspose (same names, shapes) still load."""
  variables = layers.conv_transpose(8, 2, 2, 0, name="deconv").init(jax.random.key(0), np.zeros((1, 3, 3, 5)))
  assert jax.tree.map(np.shape, variables["params"]) == {"kernel": (2, 2, 5, 8), "bias": (8,)}


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1), (1, 2), (7, 2)])
def test_conv_matches_torch(kernel, stride, cpu_kernels):
  """Values and both gradients: XLA's convolution and its autodiff, and the CPU forms (the flipped-kernel input
  gradient, the per-tap kernel gradient, the 1x1 layers' dots)."""
  rng = np.random.default_rng(kernel * 10 + stride)
  x = rng.normal(size=(2, 9, 11, 5)).astype(np.float32)
  weight = rng.normal(size=(4, 5, kernel, kernel)).astype(np.float32)  # torch (out, in, kh, kw)
  bias = rng.normal(size=(4,)).astype(np.float32)
  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  tw = torch.tensor(weight, requires_grad=True)
  tb = torch.tensor(bias, requires_grad=True)
  ty = torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=kernel // 2)
  cot = rng.normal(size=ty.shape).astype(np.float32)
  ty.backward(torch.tensor(cot))

  module = layers.conv(4, kernel, stride=stride, name="conv")
  params = {"params": {"kernel": common.conv_kernel(weight), "bias": bias}}
  y, vjp = jax.vjp(module.apply, params, x)
  dparams, dx = vjp(cot.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dparams["params"]["kernel"], common.conv_kernel(tw.grad.numpy()), atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dparams["params"]["bias"], tb.grad.numpy(), atol=1e-4, rtol=1e-5)


def test_conv_params_keep_flax_layout():
  variables = layers.conv(8, 3, name="conv").init(jax.random.key(0), np.zeros((1, 5, 5, 2)))
  assert jax.tree.map(np.shape, variables["params"]) == {"kernel": (3, 3, 2, 8), "bias": (8,)}
  variables = layers.conv(8, 1, use_bias=False, name="conv").init(jax.random.key(0), np.zeros((1, 5, 5, 2)))
  assert jax.tree.map(np.shape, variables["params"]) == {"kernel": (1, 1, 2, 8)}
