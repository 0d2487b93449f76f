"""Faster forms of the model's convolutions for XLA:CPU, and the one switch that turns them off.

The model's layers (`mrcnn_jax.modeling.layers`) each run one op of `mrcnn_jax.cpu.conv`:

  conv2d          a convolution; a custom VJP whose CPU branches (`lax.platform_dependent`) run large float32 3x3
                  stride-1 layers by Winograd's minimal filtering (`winograd`), the kernel gradient of the others as
                  one matmul per kernel tap, and the stride-1 input gradient as the forward convolution it is
  pointwise       a 1x1 convolution as a dot; a custom VJP that on CPU transposes dy once from memory for the kernel
                  gradient
  conv_transpose  torch's ConvTranspose2d as one dot (`pointwise`) and a few pads, on every backend

and the inference programs compile with `compiler.inference_options()`: XLA:CPU's own dots and convolutions instead of
YNNPACK's, 10-13% faster for the whole Mask R-CNN program (see `compiler`).

On GPU and TPU they are XLA's ops: the custom VJPs' other branches are XLA's convolution and its autodiff, and
`pointwise` and `conv_transpose` are the dots they amount to. A GPU or TPU reader can skip this package.

Why: XLA:CPU's weak spots, measured on the 2-core development machine (README, Benchmarks).
- No fast convolution algorithm. The 3x3 layers over large maps (RPN head, FPN outputs at P2 and P3, res3, res4,
  the mask head) dominate a train step; by Winograd, FPN's P2 layer at 800x1344 takes 0.43x the time forward and
  backward, the mask head's 0.60x, and the R50-FPN train step (batch 2) went from 4.45 s to 3.38-3.60 s at 512x512
  and from 14.8 s to 10.7-10.9 s at 800x1344.
- Convolution gradients. XLA:CPU computes a kernel gradient as a convolution whose "batch" is the input channels
  and whose window is the whole output map, 2-7x slower than the per-tap matmuls it amounts to; inside a conditional
  (the mask head's foreground switch) worse still: 3.7 s instead of 22 ms for one mask-head conv on 16 RoIs, 109 ms
  instead of 21 ms for its input gradient.
- 1x1 convolutions and transposed convolutions. As a convolution the mask predictor on 256 RoIs of 28x28 took
  0.76 s forward; the mask head's 2x2 deconvolution by `lax.conv_transpose` 9.8 s of backward for 0.2 s forward.
  The transpose of a 1x1 layer's einsum made XLA:CPU recompute the saved activation through up to six residual
  blocks inside a fusion; `pointwise`'s VJP and materialized activations took the step from 4.9 s to 4.4 s.

The values are those of XLA's ops within float32 rounding (Winograd's F(4x4, 3x3): about 1e-5 of the largest
output; see `winograd`), tested against float64, torch and JAX's autodiff (tests/cpu, tests/modeling/test_layers.py).

The switch: MRCNN_JAX_CPU_KERNELS=0 in the environment makes every layer run XLA's own ops with JAX's autodiff
(`lax.conv_general_dilated`, `jnp.einsum`, an input-dilated convolution for the transposed one), on CPU too, and the
inference programs compile with XLA's default options; unset or 1 (the default) uses this package. It is read by
`kernels_enabled` whenever a layer is traced (and the options when a Predictor is made), so set it before the
program is first traced: a jitted function already traced keeps what it was traced with. For measuring what this
package buys, and for ruling it out when hunting a numerical difference.
"""

from __future__ import annotations

import os

ENV_VAR = "MRCNN_JAX_CPU_KERNELS"


def kernels_enabled() -> bool:
  """Whether the layers traced now use this package's CPU forms (MRCNN_JAX_CPU_KERNELS unset or 1) or XLA's ops
  everywhere (0). Any other value is an error, so that a misspelt "off" does not leave them on."""
  value = os.environ.get(ENV_VAR, "1").strip()
  if value not in ("0", "1"):
    raise ValueError(f"{ENV_VAR}={value!r}: expected 0 (XLA's ops everywhere) or 1 (the CPU kernels, the default)")
  return value == "1"
