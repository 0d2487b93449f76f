"""Layers against torch (the matmul-form transposed convolution, `Conv`) and `conv2d`'s custom gradients against
JAX's autodiff: values and gradients."""

import jax
import numpy as np
import pytest

from mrcnn_jax.convert import common
from mrcnn_jax.modeling import layers, winograd

torch = pytest.importorskip("torch", reason="torch is the oracle; install the `parity` extra")


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 1), (3, 2, 1), (3, 1, 1), (5, 3, 2)])
def test_conv_transpose_matches_torch(kernel, stride, padding):
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


@pytest.mark.parametrize("tapwise", [False, True])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1), (1, 2), (7, 2)])
def test_conv_matches_torch(kernel, stride, tapwise, monkeypatch):
  """Values and both gradients, with the kernel gradient from XLA's convolution and from the per-tap matmuls."""
  monkeypatch.setattr(layers, "_TAPWISE_KERNEL_GRAD_ON_CPU", tapwise)
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


def _in_switch(fn):
  """fn run as a `lax.switch` branch, where the mask head runs in training."""
  return lambda x, k: jax.lax.switch(1, [lambda x, k: 2 * fn(x, k), fn], x, k)


def _assert_vjp_matches(ours, reference, x, k, rng):
  """Value and both cotangents of `ours` (jitted) against JAX's autodiff of `reference`, at full matmul precision."""
  with jax.default_matmul_precision("highest"):
    y_ref, vjp_ref = jax.vjp(reference, x, k)
    cot = rng.normal(size=y_ref.shape).astype(np.float32)
    y, (dx, dk) = jax.jit(lambda x, k, c: (ours(x, k), jax.vjp(ours, x, k)[1](c)))(x, k, cot)
    dx_ref, dk_ref = vjp_ref(cot)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("in_switch", [False, True])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 1, 0), (5, 1, 1), (3, 2, 1), (2, 1, 1)])
def test_conv2d_gradients_match_xla_autodiff(kernel, stride, padding, in_switch):
  """`conv2d`'s own gradients (flipped-kernel input gradient, per-tap kernel gradient on CPU) against JAX's autodiff
  of the plain convolution, in and out of a switch."""
  rng = np.random.default_rng(kernel * 100 + stride * 10 + padding)
  x = rng.normal(size=(3, 8, 9, 5)).astype(np.float32)
  k = rng.normal(size=(kernel, kernel, 5, 4)).astype(np.float32)
  pads = ((padding, padding), (padding, padding))

  def reference(x, k):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def ours(x, k):
    return layers.conv2d(x, k, stride, padding)

  _assert_vjp_matches(_in_switch(ours) if in_switch else ours, reference, x, k, rng)


@pytest.mark.parametrize("in_switch", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (11, 7)])
def test_pointwise_gradients_match_einsum_autodiff(shape, in_switch):
  """`pointwise` (1x1 convolutions, the deconvolution's matmul) against JAX's autodiff of the einsum it computes."""
  rng = np.random.default_rng(len(shape))
  x = rng.normal(size=shape).astype(np.float32)
  k = rng.normal(size=(shape[-1], 3)).astype(np.float32)
  ours = _in_switch(layers.pointwise) if in_switch else layers.pointwise
  _assert_vjp_matches(ours, lambda x, k: jax.numpy.einsum("...c,co->...o", x, k), x, k, rng)


def test_pointwise_kernel_gradient_forms_agree():
  """The CPU form of the kernel gradient (dy transposed from memory) and the one other backends run give the same
  (C, O) matrix; only the first runs in a CPU program, so the second is checked here directly."""
  rng = np.random.default_rng(0)
  x2, dy2 = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(50, 4)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    cpu = layers._pointwise_kernel_grad_cpu(x2, dy2)
    default = layers._pointwise_kernel_grad(x2, dy2)
  np.testing.assert_allclose(cpu, x2.T @ dy2, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(default, x2.T @ dy2, atol=1e-4, rtol=1e-5)


def test_pointwise_keeps_dtypes():
  """bfloat16 compute: gradients come back in the dtypes of x and kernel (the kernel's accumulated in float32)."""
  x = jax.numpy.ones((2, 3, 3, 4), jax.numpy.bfloat16)
  k = jax.numpy.ones((4, 5), jax.numpy.bfloat16)
  y, vjp = jax.vjp(layers.pointwise, x, k)
  dx, dk = vjp(jax.numpy.ones_like(y))
  assert (y.dtype, dx.dtype, dk.dtype) == (jax.numpy.bfloat16,) * 3
  np.testing.assert_allclose(np.asarray(dk, np.float32), np.full((4, 5), 18.0))


def _conv3x3_float64(x, k, cot, padding=1):
  """y, dx and dk of a 3x3 stride-1 convolution, in float64 with numpy, tap by tap."""
  x, k, cot = (np.asarray(a, np.float64) for a in (x, k, cot))
  ho, wo = cot.shape[1:3]
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  y = sum(xp[:, i:i + ho, j:j + wo] @ k[i, j] for i in range(3) for j in range(3))
  dxp = np.zeros_like(xp)
  for i in range(3):
    for j in range(3):
      dxp[:, i:i + ho, j:j + wo] += cot @ k[i, j].T
  dk = np.stack([np.stack([np.einsum("nhwc,nhwo->co", xp[:, i:i + ho, j:j + wo], cot) for j in range(3)])
                 for i in range(3)])
  return y, dxp[:, padding:xp.shape[1] - padding, padding:xp.shape[2] - padding], dk


# Largest error of each Winograd transform against a float64 convolution, relative to the largest magnitude:
# F(2x2, 3x3) is as exact as a direct float32 convolution, F(4x4, 3x3) about ten times less (see `winograd`).
_WINOGRAD_RTOL = {2: 2e-6, 4: 2e-5}


@pytest.mark.parametrize("t", [winograd.F2, winograd.F4], ids=["F2", "F4"])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("hw", [(6, 8), (7, 5), (9, 13)])
def test_winograd_convolution_and_kernel_gradient_match_float64(hw, padding, t):
  """Winograd's forms (the convolution, and the kernel gradient from the transformed tiles) against a float64
  convolution, on sizes that are and are not whole tiles (outputs cropped) and every padding the forward (0, 1) and
  the input gradient (2 - padding) use."""
  rng = np.random.default_rng(padding * 10 + hw[0])
  x = rng.normal(size=(2, *hw, 5)).astype(np.float32)
  k = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
  out_hw = (hw[0] + 2 * padding - 2, hw[1] + 2 * padding - 2)
  cot = rng.normal(size=(2, *out_hw, 4)).astype(np.float32)
  y_exact, _, dk_exact = _conv3x3_float64(x, k, cot, padding)
  with jax.default_matmul_precision("highest"):
    y = winograd.conv3x3(x, k, padding, t)
    dk = winograd.kernel_grad(x, cot, padding, t)
  rtol = _WINOGRAD_RTOL[t.m]
  assert y.shape == y_exact.shape and dk.shape == dk_exact.shape
  np.testing.assert_allclose(y, y_exact, atol=rtol * np.abs(y_exact).max(), rtol=0)
  np.testing.assert_allclose(dk, dk_exact, atol=rtol * np.abs(dk_exact).max(), rtol=0)


@pytest.mark.parametrize("in_switch", [False, True])
@pytest.mark.parametrize("hw,m", [((32, 33), 2), ((64, 65), 4)])
def test_conv2d_runs_winograd_where_it_applies(hw, m, in_switch):
  """3x3 stride-1 layers big enough for Winograd on CPU (128 -> 128 channels; 2x32x33 output pixels take F(2x2, 3x3),
  2x64x65 F(4x4, 3x3)) compute it without any convolution op, with the values and gradients of the exact (float64)
  convolution within the transform's tolerance. XLA's own float32 convolution is no closer than F(2x2, 3x3) (at
  2x32x33 its kernel gradient is off by 1.8e-6 of the largest entry, F(2x2, 3x3)'s by 0.7e-6). A smaller layer
  keeps XLA's convolution."""
  rng = np.random.default_rng(m)
  x = rng.normal(size=(2, *hw, 128)).astype(np.float32)
  k = (0.05 * rng.normal(size=(3, 3, 128, 128))).astype(np.float32)
  cot = rng.normal(size=(2, *hw, 128)).astype(np.float32)
  assert layers._cpu_winograd(x, k, 1, 1).m == m

  def ours(x, k):
    return layers.conv2d(x, k, 1, 1)

  fn = _in_switch(ours) if in_switch else ours

  def value_and_grads(x, k, cot):
    y, vjp = jax.vjp(fn, x, k)
    return y, *vjp(cot)

  with jax.default_matmul_precision("highest"):
    got = jax.jit(value_and_grads)(x, k, cot)
    compiled = jax.jit(value_and_grads).lower(x, k, cot).compile().as_text()
    small = jax.jit(value_and_grads).lower(x[:, :16, :16], k, cot[:, :16, :16]).compile().as_text()
  for name, ours_value, exact in zip(("y", "dx", "dk"), got, _conv3x3_float64(x, k, cot)):
    np.testing.assert_allclose(ours_value, exact, atol=_WINOGRAD_RTOL[m] * np.abs(exact).max(), rtol=0, err_msg=name)
  if jax.default_backend() == "cpu":
    assert " convolution(" not in compiled
    assert " convolution(" in small  # 2 x 16 x 16 output pixels


def test_cpu_winograd_choice_follows_the_measured_rule():
  """F(4x4, 3x3) on large maps, F(2x2, 3x3) on mid-sized work and small maps (the mask head's 14x14), XLA's
  convolution for small work, thin layers, strides, other kernel sizes and bfloat16."""

  def choose(x_shape, kernel_shape, stride=1, padding=1, dtype=np.float32):
    return layers._cpu_winograd(jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(kernel_shape, dtype),
                                stride, padding)

  assert choose((2, 200, 336, 256), (3, 3, 256, 256)) is winograd.F4  # FPN's P2 at 800x1344
  assert choose((2, 64, 64, 128), (3, 3, 128, 128)) is winograd.F4  # 8192 pixels
  assert choose((2, 32, 32, 256), (3, 3, 256, 256)) is winograd.F2  # 2048 pixels
  assert choose((64, 14, 14, 256), (3, 3, 256, 256)) is winograd.F2  # many pixels, small maps
  assert choose((2, 16, 16, 512), (3, 3, 512, 512)) is None  # 512 pixels
  assert choose((2, 128, 128, 64), (3, 3, 64, 64)) is None  # 64 channels
  assert choose((2, 128, 128, 256), (3, 3, 256, 256), stride=2) is None
  assert choose((2, 128, 128, 256), (5, 5, 256, 256), padding=2) is None
  assert choose((2, 128, 128, 256), (3, 3, 256, 256), dtype=jax.numpy.bfloat16) is None
