"""`cpu.winograd`'s convolution and kernel gradient against a float64 convolution."""

import jax
import numpy as np
import pytest

from mrcnn_jax.cpu import winograd

import conv_float64


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
  y_exact, _, dk_exact = conv_float64.conv3x3(x, k, cot, padding)
  with jax.default_matmul_precision("highest"):
    y = winograd.conv3x3(x, k, padding, t)
    dk = winograd.kernel_grad(x, cot, padding, t)
  rtol = conv_float64.WINOGRAD_RTOL[t.m]
  assert y.shape == y_exact.shape and dk.shape == dk_exact.shape
  np.testing.assert_allclose(y, y_exact, atol=rtol * np.abs(y_exact).max(), rtol=0)
  np.testing.assert_allclose(dk, dk_exact, atol=rtol * np.abs(dk_exact).max(), rtol=0)
