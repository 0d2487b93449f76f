"""XLA:CPU compiler options for the inference programs (`inference_options`).

Why: XLA:CPU (jaxlib 0.10) hands every dot and convolution to YNNPACK by default
(`xla_cpu_experimental_ynn_fusion_type`, the "__ynn_fusion" custom fusions in the compiled HLO). On the 2-core
development machine (AVX2) its own Eigen kernels are faster for what the model runs: the batched Winograd matmul
(36 x 6800x256 @ 256x256) 349-391 ms against 459-474, FPN's P2 output conv by F(4x4, 3x3) (2x200x272x256) 554 ms
against 657, the mask head's 3x3 convs by F(2x2, 3x3) (200x14x14x256) 230 ms against 264; the whole R50-FPN Mask
R-CNN inference program at 640x480 (800x1088 canvas), both forms compiled in one process and run interleaved, medians
of 10: batch 1 3673 -> 3177 ms, batch 2 6908 -> 6226 ms; boxes within 6e-5 px, scores within 1e-7. The train step
measured the same either way (R50-FPN, 512x512, batch 2: 5952 against 6080 ms, within the noise), so it keeps XLA's
defaults and the numbers it trains to.

Where: JAX takes compiler options on a top-level jit only (a jitted function with options cannot be called inside
another jit), so `mask_rcnn.build_infer` stays composable without them and the program that runs on its own adds
them: `Predictor` (and through it `evaluate`, `predict` and the main job) and `scripts/benchmark.py model`.
Only programs built while JAX's default backend is the CPU get the options; other backends have no YNNPACK and get
none. A jaxlib that does not know the option (it is experimental) is told once by a warning and compiles with its
defaults. MRCNN_JAX_CPU_KERNELS=0 (`kernels_enabled`) drops the options too: XLA's defaults everywhere.
"""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np

from mrcnn_jax.cpu import kernels_enabled

# An empty list of YNNPACK fusion types: XLA:CPU's own (Eigen) dots and convolutions.
CPU_INFERENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _accepted(option: str, value) -> bool:
  """Whether this jaxlib's CPU compiler takes `option=value` (a one-op program compiled with it)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except  # jaxlib raises its own runtime error types
    logging.warning("XLA:CPU does not take the compiler option %s=%r (%s); the inference programs compile with "
                    "XLA's defaults, which on CPU run about 10%% slower", option, value, str(e).splitlines()[0])
    return False
  return True


def inference_options() -> dict:
  """The `compiler_options` for `jax.jit` of an inference program: `CPU_INFERENCE_OPTIONS` when JAX's default
  backend is the CPU (and the CPU kernels are on and this jaxlib takes them), else {}."""
  if not kernels_enabled() or jax.default_backend() != "cpu":
    return {}
  return {k: v for k, v in CPU_INFERENCE_OPTIONS.items() if _accepted(k, v)}
