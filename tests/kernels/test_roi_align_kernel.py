"""The Pallas RoIAlign kernels against their XLA reference (interpreted on CPU), and their GPU/TPU lowering.

The XLA reference itself is checked against torchvision in tests/ops/test_roi_align.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.kernels import roi_align as k
from mrcnn_jax.ops import roi_align as ra


def _inputs(seed, n, c, r, p, kk):
  rng = np.random.default_rng(seed)
  table = jnp.asarray(rng.standard_normal((n, c)).astype(np.float32))
  idx = jnp.asarray(rng.integers(0, n, (r, p, kk)).astype(np.int32))
  weights = jnp.asarray(rng.random((r, p, kk)).astype(np.float32))
  return table, idx, weights


def _loss(impl):
  # A non-linear function of the output so that every cotangent entry differs.
  return lambda t, w, i: jnp.sum(jnp.sin(k.weighted_gather(t, i, w, impl=impl)))


@pytest.mark.parametrize(
    "interpret, n, c, r, p, kk",
    [
        ("gpu", 300, 256, 5, 49, 16),  # two channel blocks; P padded 49 -> 64
        ("gpu", 50, 8, 3, 7, 4),  # fewer channels than a block
        ("tpu", 40, 128, 2, 5, 4),  # the TPU interpreter simulates each DMA: keep it tiny
    ],
)
def test_kernel_matches_reference(interpret, n, c, r, p, kk):
  table, idx, weights = _inputs(0, n, c, r, p, kk)
  want = k.weighted_gather_reference(table, idx, weights)
  got = k.weighted_gather_pallas(table, idx, weights, interpret=interpret)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  impl = f"pallas_interpret_{interpret}"
  want_grads = jax.grad(_loss("xla"), argnums=(0, 1))(table, weights, idx)
  got_grads = jax.grad(_loss(impl), argnums=(0, 1))(table, weights, idx)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-5)


def test_roi_align_through_the_gpu_kernel_matches_xla():
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.standard_normal((2, 12, 16, 8)).astype(np.float32))
  xy = rng.uniform(-8, 50, (2, 6, 2))
  boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(0, 40, (2, 6, 2))], -1).astype(np.float32))

  def f(impl):
    return lambda x: jnp.sum(ra.roi_align(x, boxes, 7, 0.25, 2, True, impl=impl) ** 2)

  np.testing.assert_allclose(
      np.asarray(ra.roi_align(features, boxes, 7, 0.25, 2, True, impl="pallas_interpret_gpu")),
      np.asarray(ra.roi_align(features, boxes, 7, 0.25, 2, True, impl="xla")), atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(jax.grad(f("pallas_interpret_gpu"))(features)), np.asarray(jax.grad(f("xla"))(features)),
      atol=1e-4)


def _lowered_text(platform):
  features = [jax.ShapeDtypeStruct((2, 64 // 2**i, 96 // 2**i, 256), jnp.float32) for i in range(4)]
  boxes = jax.ShapeDtypeStruct((2, 128, 4), jnp.float32)

  def loss(fs, b):
    return jnp.sum(ra.multilevel_roi_align(fs, b, 7, 2, True, impl="pallas") ** 2)

  train = jax.jit(jax.value_and_grad(loss)).trace(features, boxes)
  return train.lower(lowering_platforms=(platform,)).as_text()


def test_lowers_for_gpu():
  text = _lowered_text("cuda")
  assert "xla.gpu.triton" in text and "roi_align_weighted_gather_gpu" in text
  assert "tpu_custom_call" not in text


def test_lowers_for_tpu():
  text = _lowered_text("tpu")
  assert "tpu_custom_call" in text
  assert "xla.gpu.triton" not in text


def test_pallas_on_cpu_without_interpreter_is_an_error():
  table, idx, weights = _inputs(0, 10, 8, 1, 3, 2)
  with pytest.raises(Exception, match="cpu"):
    k.weighted_gather(table, idx, weights, impl="pallas")


def test_defaults_and_bad_arguments():
  assert k.default_impl("cpu") == "xla"
  assert set(k.tuning.DEFAULT_IMPL.values()) <= set(k.IMPLS)
  table, idx, weights = _inputs(0, 10, 8, 1, 3, 2)
  with pytest.raises(ValueError, match="unknown impl"):
    k.weighted_gather(table, idx, weights, impl="triton")
  with pytest.raises(ValueError, match="interpret"):
    k.weighted_gather_pallas(table, idx, weights, interpret="cpu")
