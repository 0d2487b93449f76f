"""`cpu.conv`'s ops with the CPU kernels on: their custom gradients against JAX's autodiff of the plain op, Winograd
where it applies against a float64 convolution, and the rule that picks it. (The layers built on them are tested
against torch, with the kernels on and off, in tests/modeling/test_layers.py.)"""

import jax
import numpy as np
import pytest

from mrcnn_jax import cpu
from mrcnn_jax.cpu import conv, winograd

import conv_float64


@pytest.fixture(autouse=True)
def _cpu_kernels_on(monkeypatch):
  """The CPU kernels are what these tests test, whatever the environment says."""
  monkeypatch.setenv(cpu.ENV_VAR, "1")


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
    return conv.conv2d(x, k, stride, padding)

  _assert_vjp_matches(_in_switch(ours) if in_switch else ours, reference, x, k, rng)


@pytest.mark.parametrize("in_switch", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (11, 7)])
def test_pointwise_gradients_match_einsum_autodiff(shape, in_switch):
  """`pointwise` (1x1 convolutions, the deconvolution's matmul) against JAX's autodiff of the einsum it computes."""
  rng = np.random.default_rng(len(shape))
  x = rng.normal(size=shape).astype(np.float32)
  k = rng.normal(size=(shape[-1], 3)).astype(np.float32)
  ours = _in_switch(conv.pointwise) if in_switch else conv.pointwise
  _assert_vjp_matches(ours, lambda x, k: jax.numpy.einsum("...c,co->...o", x, k), x, k, rng)


def test_pointwise_kernel_gradient_forms_agree():
  """The CPU form of the kernel gradient (dy transposed from memory) and the one other backends run give the same
  (C, O) matrix; only the first runs in a CPU program, so the second is checked here directly."""
  rng = np.random.default_rng(0)
  x2, dy2 = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(50, 4)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    cpu_form = conv._pointwise_kernel_grad_cpu(x2, dy2)
    default = conv._pointwise_kernel_grad(x2, dy2)
  np.testing.assert_allclose(cpu_form, x2.T @ dy2, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(default, x2.T @ dy2, atol=1e-4, rtol=1e-5)


def test_pointwise_keeps_dtypes():
  """bfloat16 compute: gradients come back in the dtypes of x and kernel (the kernel's accumulated in float32)."""
  x = jax.numpy.ones((2, 3, 3, 4), jax.numpy.bfloat16)
  k = jax.numpy.ones((4, 5), jax.numpy.bfloat16)
  y, vjp = jax.vjp(conv.pointwise, x, k)
  dx, dk = vjp(jax.numpy.ones_like(y))
  assert (y.dtype, dx.dtype, dk.dtype) == (jax.numpy.bfloat16,) * 3
  np.testing.assert_allclose(np.asarray(dk, np.float32), np.full((4, 5), 18.0))


@pytest.mark.parametrize("in_switch", [False, True])
@pytest.mark.parametrize("hw,forward_m,backward_m", [((16, 17), 2, None), ((32, 33), 2, 2), ((64, 65), 4, 4)])
def test_conv2d_runs_winograd_where_it_applies(hw, forward_m, backward_m, in_switch):
  """3x3 stride-1 layers big enough for Winograd on CPU (128 -> 128 channels) compute it, the forward by the
  `FORWARD` rule and the gradients by the `BACKWARD` one (2x16x17 output pixels: F(2x2, 3x3) forward, XLA's
  convolution backward; 2x32x33: F(2x2, 3x3) both; 2x64x65: F(4x4, 3x3) both), with the
  values and gradients of the exact (float64) convolution within each transform's tolerance. XLA's own float32
  convolution is no closer than F(2x2, 3x3) (at 2x32x33 its kernel gradient is off by 1.8e-6 of the largest entry,
  F(2x2, 3x3)'s by 0.7e-6), so it is held to F(2x2, 3x3)'s tolerance. Where both rules pick Winograd, the compiled
  program has no convolution op."""
  rng = np.random.default_rng(sum(hw))
  x = rng.normal(size=(2, *hw, 128)).astype(np.float32)
  k = (0.05 * rng.normal(size=(3, 3, 128, 128))).astype(np.float32)
  cot = rng.normal(size=(2, *hw, 128)).astype(np.float32)
  assert conv._winograd_for(x, k, 1, 1, conv.FORWARD).m == forward_m
  backward = conv._winograd_for(x, k, 1, 1, conv.BACKWARD)
  assert (backward and backward.m) == backward_m

  def ours(x, k):
    return conv.conv2d(x, k, 1, 1)

  fn = _in_switch(ours) if in_switch else ours

  def value_and_grads(x, k, cot):
    y, vjp = jax.vjp(fn, x, k)
    return y, *vjp(cot)

  with jax.default_matmul_precision("highest"):
    got = jax.jit(value_and_grads)(x, k, cot)
    compiled = jax.jit(value_and_grads).lower(x, k, cot).compile().as_text()
  rtol = {"y": conv_float64.WINOGRAD_RTOL[forward_m], "dx": conv_float64.WINOGRAD_RTOL[backward_m or 2],
          "dk": conv_float64.WINOGRAD_RTOL[backward_m or 2]}
  for name, ours_value, exact in zip(("y", "dx", "dk"), got, conv_float64.conv3x3(x, k, cot)):
    np.testing.assert_allclose(ours_value, exact, atol=rtol[name] * np.abs(exact).max(), rtol=0, err_msg=name)
  if jax.default_backend() == "cpu":
    assert (" convolution(" in compiled) == (backward_m is None)


def test_winograd_choice_follows_the_measured_rules():
  """Forward (`FORWARD`, measured on the forward convolution alone): F(2x2, 3x3) from 512 output pixels and 64
  channels, on small maps too (the mask head's 14x14); F(4x4, 3x3) only where the gradients have it. Gradients
  (`BACKWARD`, measured forward and backward together): F(4x4, 3x3) from 8192 pixels on maps of at least 32x32,
  F(2x2, 3x3) from 2048, from 128 channels. XLA's convolution for smaller work, thinner layers, strides, other
  kernel sizes and bfloat16 under both."""

  def choose(x_shape, kernel_shape, stride=1, padding=1, dtype=np.float32, rule=conv.FORWARD):
    return conv._winograd_for(jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(kernel_shape, dtype),
                              stride, padding, rule)

  forward = {
      ((2, 200, 336, 256), (3, 3, 256, 256)): winograd.F4,  # FPN's P2 at 800x1344
      ((2, 64, 64, 128), (3, 3, 128, 128)): winograd.F4,  # 8192 pixels
      ((1, 50, 68, 256), (3, 3, 256, 256)): winograd.F2,  # res4 at 800x1088, 3400 pixels
      ((1, 200, 272, 64), (3, 3, 64, 64)): winograd.F2,  # res2, 64 channels
      ((2, 32, 32, 256), (3, 3, 256, 256)): winograd.F2,  # 2048 pixels
      ((200, 14, 14, 256), (3, 3, 256, 256)): winograd.F2,  # the mask head
      ((2, 16, 16, 512), (3, 3, 512, 512)): winograd.F2,  # 512 pixels
      ((1, 25, 34, 512), (3, 3, 512, 512)): winograd.F2,  # res5 at 800x1088
      ((1, 13, 17, 512), (3, 3, 512, 512)): None,  # 221 pixels
      ((2, 128, 128, 32), (3, 3, 32, 32)): None,  # 32 channels
  }
  backward = {
      ((2, 200, 336, 256), (3, 3, 256, 256)): winograd.F4,
      ((2, 64, 64, 128), (3, 3, 128, 128)): winograd.F4,  # 8192 pixels
      ((2, 32, 32, 256), (3, 3, 256, 256)): winograd.F2,  # 2048 pixels
      ((64, 14, 14, 256), (3, 3, 256, 256)): winograd.F2,  # many pixels, small maps
      ((2, 16, 16, 512), (3, 3, 512, 512)): None,  # 512 pixels
      ((2, 128, 128, 64), (3, 3, 64, 64)): None,  # 64 channels
  }
  for rule, expected in ((conv.FORWARD, forward), (conv.BACKWARD, backward)):
    for (x_shape, kernel_shape), t in expected.items():
      assert choose(x_shape, kernel_shape, rule=rule) is t, (rule, x_shape, kernel_shape)
    assert choose((2, 128, 128, 256), (3, 3, 256, 256), stride=2, rule=rule) is None
    assert choose((2, 128, 128, 256), (5, 5, 256, 256), padding=2, rule=rule) is None
    assert choose((2, 128, 128, 256), (3, 3, 256, 256), dtype=jax.numpy.bfloat16, rule=rule) is None
