"""The oracle of the CPU convolution tests: a 3x3 stride-1 convolution and both its gradients in float64 numpy."""

import numpy as np

# Largest error of each Winograd transform against a float64 convolution, relative to the largest magnitude:
# F(2x2, 3x3) is as exact as a direct float32 convolution, F(4x4, 3x3) about ten times less (see `cpu.winograd`).
WINOGRAD_RTOL = {2: 2e-6, 4: 2e-5}


def conv3x3(x, k, cot, padding=1):
  """y, dx and dk of a 3x3 stride-1 convolution of x (N, H, W, C) by k (3, 3, C, O) under the cotangent cot
  (N, Ho, Wo, O), in float64, tap by tap."""
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
