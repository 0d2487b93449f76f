"""RoIAlign against hand-computed values and torchvision.ops.roi_align / MultiScaleRoIAlign (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import roi_align as ra

torch = pytest.importorskip("torch", reason="torch is the RoIAlign oracle; install the `parity` extra")
torchvision = pytest.importorskip("torchvision", reason="torchvision is the RoIAlign oracle")


def _random_boxes(rng, b, r, lo, hi, min_size, max_size):
  xy = rng.uniform(lo, hi, (b, r, 2))
  wh = rng.uniform(min_size, max_size, (b, r, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def _torch_roi_align(features, boxes, output_size, scale, sampling_ratio, aligned, grad_out=None):
  """torchvision on NHWC numpy arrays; returns (B, R, oh, ow, C) and, with grad_out, d features (B, H, W, C)."""
  b, r = boxes.shape[:2]
  f = torch.tensor(features).permute(0, 3, 1, 2).contiguous().requires_grad_(grad_out is not None)
  out = torchvision.ops.roi_align(f, [torch.tensor(x) for x in boxes], output_size, scale, sampling_ratio, aligned)
  out_nhwc = out.permute(0, 2, 3, 1).reshape((b, r) + out.shape[2:] + out.shape[1:2])
  if grad_out is None:
    return out_nhwc.detach().numpy(), None
  out_nhwc.backward(torch.tensor(grad_out))
  return out_nhwc.detach().numpy(), f.grad.permute(0, 2, 3, 1).numpy()


class TestHandComputed:
  # f[y, x] = 5y + x: bilinear interpolation reproduces a linear function exactly, so each bin is 5*mean(y) + mean(x).
  features = (5 * np.arange(5)[:, None] + np.arange(5)[None, :]).astype(np.float32)[None, :, :, None]

  def test_aligned_half_pixel(self):
    # aligned: box [1, 3] -> feature coords [0.5, 2.5]; 2 samples at 1.0 and 2.0 on each axis -> 5*1.5 + 1.5.
    out = ra.roi_align(jnp.asarray(self.features), jnp.array([[[1.0, 1.0, 3.0, 3.0]]]), 1, 1.0, 2, True)
    np.testing.assert_allclose(np.asarray(out).ravel(), [9.0], atol=1e-6)

  def test_legacy_bins(self):
    # legacy: box [0, 4], 2x2 bins of size 2, one sample each at 1 and 3.
    out = ra.roi_align(jnp.asarray(self.features), jnp.array([[[0.0, 0.0, 4.0, 4.0]]]), 2, 1.0, 1, False)
    np.testing.assert_allclose(np.asarray(out)[0, 0, :, :, 0], [[6.0, 8.0], [16.0, 18.0]], atol=1e-6)

  def test_samples_outside_read_zero_and_border_is_clamped(self):
    f = jnp.asarray(self.features)
    # Sample at (-2, -2): beyond -1 on both axes, reads 0.
    out = ra.roi_align(f, jnp.array([[[-2.5, -2.5, -1.5, -1.5]]]), 1, 1.0, 1, False)
    assert float(out.ravel()[0]) == 0.0
    # Sample at (-0.5, 2): in [-1, 0] -> clamped to row 0 -> f[0, 2] = 2.
    out = ra.roi_align(f, jnp.array([[[1.5, -1.0, 2.5, 0.0]]]), 1, 1.0, 1, False)
    np.testing.assert_allclose(np.asarray(out).ravel(), [2.0], atol=1e-6)
    # Sample at (4.5, 4.5): past the last row/column but <= size -> clamped to f[4, 4] = 24.
    out = ra.roi_align(f, jnp.array([[[4.0, 4.0, 5.0, 5.0]]]), 1, 1.0, 1, False)
    np.testing.assert_allclose(np.asarray(out).ravel(), [24.0], atol=1e-6)

  def test_adaptive_grid_counts_samples(self):
    # Adaptive: a 4-pixel bin gets ceil(4/1) = 4 samples per axis at 0.5, 1.5, 2.5, 3.5 (legacy) -> mean 2 -> 12.
    out = ra.roi_align(jnp.asarray(self.features), jnp.array([[[0.0, 0.0, 4.0, 4.0]]]), 1, 1.0, 0, False)
    np.testing.assert_allclose(np.asarray(out).ravel(), [12.0], atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 0])
def test_matches_torchvision_values_and_gradients(aligned, sampling_ratio):
  rng = np.random.default_rng(sampling_ratio + 10 * aligned)
  b, h, w, c, r = 2, 24, 30, 8, 40
  features = rng.standard_normal((b, h, w, c)).astype(np.float32)
  # Boxes partly outside the image, larger than the image, tiny, and of zero area.
  boxes = _random_boxes(rng, b, r, -30, 110, 0, 90)
  boxes[0, 0] = [-50, -40, 200, 180]  # larger than the image on every side
  boxes[0, 1] = [10, 10, 10, 10]  # zero area
  boxes[1, 2] = [40, 30, 40.5, 80]  # zero-ish width
  grad_out = rng.standard_normal((b, r, 5, 6, c)).astype(np.float32)
  # 0.25: a stride-4 feature map. max_sampling_ratio 12 covers every RoI here (the largest, 250 px = 62.5 feature
  # px over 6 bins, needs 11), so the adaptive form is exact.
  want, want_grad = _torch_roi_align(features, boxes, (5, 6), 0.25, sampling_ratio, aligned, grad_out)

  def f(x):
    return ra.roi_align(x, jnp.asarray(boxes), (5, 6), 0.25, sampling_ratio, aligned, max_sampling_ratio=12)

  got, vjp = jax.vjp(jax.jit(f), jnp.asarray(features))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(grad_out))[0]), want_grad, atol=1e-5, rtol=1e-5)


def test_adaptive_bound_uses_that_many_samples():
  # A RoI that needs 12 samples per bin with the bound at 3 is pooled with 3 evenly spaced samples: torchvision's
  # sampling_ratio=3 is the oracle.
  rng = np.random.default_rng(0)
  features = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)
  boxes = np.array([[[2.0, 3.0, 60.0, 62.0], [0.0, 0.0, 64.0, 64.0]]], np.float32)
  want, _ = _torch_roi_align(features, boxes, (5, 5), 1.0, 3, True)
  got = ra.roi_align(jnp.asarray(features), jnp.asarray(boxes), 5, 1.0, 0, True, max_sampling_ratio=3)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_all_padding_boxes_are_finite():
  features = jnp.ones((1, 8, 8, 3))
  out = ra.roi_align(features, jnp.zeros((1, 5, 4)), 7, 0.25, 0, True)
  assert out.shape == (1, 5, 7, 7, 3)
  assert np.all(np.asarray(out) == 0.0)  # aligned zero-size RoIs have no samples
  out = ra.roi_align(features, jnp.zeros((1, 5, 4)), 7, 0.25, 2, False)
  np.testing.assert_allclose(np.asarray(out), 1.0, rtol=1e-6)  # legacy RoIs are at least 1x1 and read the features


class TestAssignFpnLevels:
  def test_hand_values(self):
    sides = np.array([224, 112, 448, 56, 1000, 10, 0, 223.9, 224.1], np.float32)
    boxes = jnp.asarray(np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], -1))
    got = np.asarray(ra.assign_fpn_levels(boxes, 2, 5))
    np.testing.assert_array_equal(got, [4, 3, 5, 2, 5, 2, 2, 3, 4])

  def test_torchvision_level_mapper(self):
    from torchvision.ops.poolers import LevelMapper

    rng = np.random.default_rng(1)
    boxes = _random_boxes(rng, 1, 500, 0, 800, 1, 900)[0]
    mapper = LevelMapper(2, 5)
    want = mapper([torch.tensor(boxes)]).numpy() + 2
    got = np.asarray(ra.assign_fpn_levels(jnp.asarray(boxes), 2, 5, convention="torchvision"))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_multilevel_matches_torchvision_multiscale(sampling_ratio):
  from torchvision.ops import MultiScaleRoIAlign

  rng = np.random.default_rng(7)
  b, c, image_hw = 2, 4, (256, 320)
  shapes = [(image_hw[0] // 2**l, image_hw[1] // 2**l) for l in range(2, 6)]
  feats = [rng.standard_normal((b,) + s + (c,)).astype(np.float32) for s in shapes]
  # Sides from 8 to 700 px so that every level gets boxes; aspect ratios within 1:3 so that the adaptive form's
  # bound of 16 samples per bin covers every box (a 17x532 box on P2 would need 19).
  boxes = _random_boxes(rng, b, 60, -10, 250, 8, 700)
  w = boxes[..., 2] - boxes[..., 0]
  boxes[..., 3] = boxes[..., 1] + np.clip(boxes[..., 3] - boxes[..., 1], w / 3, w * 3)
  levels = np.asarray(ra.assign_fpn_levels(jnp.asarray(boxes), 2, 5, convention="torchvision"))
  assert set(levels.ravel()) == {2, 3, 4, 5}
  grad_out = rng.standard_normal((b, 60, 7, 7, c)).astype(np.float32)

  pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio)
  tf = [torch.tensor(f).permute(0, 3, 1, 2).contiguous().requires_grad_(True) for f in feats]
  out = pooler({str(i): f for i, f in enumerate(tf)}, [torch.tensor(x) for x in boxes], [image_hw] * b)
  out = out.permute(0, 2, 3, 1).reshape(b, 60, 7, 7, c)
  out.backward(torch.tensor(grad_out))

  def f(fs):
    return ra.multilevel_roi_align(
        fs, jnp.asarray(boxes), 7, sampling_ratio, False, level_convention="torchvision", max_sampling_ratio=16)

  got, vjp = jax.vjp(jax.jit(f), [jnp.asarray(x) for x in feats])
  np.testing.assert_allclose(np.asarray(got), out.detach().numpy(), atol=1e-5, rtol=1e-5)
  grads = vjp(jnp.asarray(grad_out))[0]
  for g, t in zip(grads, tf):
    np.testing.assert_allclose(np.asarray(g), t.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)


def test_multilevel_aligned_equals_per_level_roi_align():
  # Detectron2's pooler (aligned=True) is, per box, a single-level RoIAlign on the box's level.
  rng = np.random.default_rng(3)
  feats = [rng.standard_normal((1, 64 // 2**i, 64 // 2**i, 3)).astype(np.float32) for i in range(4)]
  boxes = _random_boxes(rng, 1, 30, 0, 200, 4, 300)
  got = np.asarray(ra.multilevel_roi_align(
      [jnp.asarray(f) for f in feats], jnp.asarray(boxes), 7, 0, True, max_sampling_ratio=16))
  levels = np.asarray(ra.assign_fpn_levels(jnp.asarray(boxes), 2, 5))[0]
  for i in range(boxes.shape[1]):
    lvl = levels[i]
    want, _ = _torch_roi_align(feats[lvl - 2], boxes[:, i:i + 1], (7, 7), 2.0**-lvl, 0, True)
    np.testing.assert_allclose(got[:, i:i + 1], want, atol=1e-5, err_msg=f"box {i} on level {lvl}")


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match="unknown impl"):
    ra.roi_align(jnp.ones((1, 4, 4, 1)), jnp.zeros((1, 1, 4)), 2, 1.0, 2, True, impl="cuda")
