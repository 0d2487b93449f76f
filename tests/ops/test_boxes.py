"""Box ops against torchvision (box_iou, BoxCoder) and hand-computed values, eagerly and under jit."""

import math

import jax
import numpy as np
import pytest

from mrcnn_jax.ops import boxes as B

torch = pytest.importorskip("torch")
tv_ops = pytest.importorskip("torchvision.ops")
tv_utils = pytest.importorskip("torchvision.models.detection._utils")

# Every test runs its function both eagerly and jitted.
jit_modes = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


def maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


def random_boxes(rng, n, max_xy=100.0, max_wh=50.0, zero_frac=0.0):
  """(n, 4) float32 XYXY boxes; a zero_frac fraction of them get zero width or height."""
  xy = rng.uniform(0, max_xy, (n, 2))
  wh = rng.uniform(1.0, max_wh, (n, 2))
  zero = rng.random(n) < zero_frac
  wh[zero, rng.integers(0, 2, zero.sum())] = 0.0
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------- IoU


@jit_modes
def test_box_iou_known_values(use_jit):
  a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 5]], np.float32)
  b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [10, 0, 20, 10]], np.float32)
  iou = np.asarray(maybe_jit(B.box_iou, use_jit)(a, b))
  assert iou.shape == (4, 4) and iou.dtype == np.float32
  assert iou[0, 0] == pytest.approx(25 / 175)  # 5x5 overlap, union 100 + 100 - 25
  assert iou[1, 1] == 1.0
  assert iou[2, 2] == 0.0  # disjoint
  assert iou[0, 3] == 0.0  # touching edges: zero-width intersection
  assert iou[3, 1] == pytest.approx(20 / 100)  # contained: 4x5 inside 10x10


@jit_modes
def test_box_iou_matches_torchvision(use_jit):
  rng = np.random.default_rng(0)
  a = random_boxes(rng, 37)
  b = random_boxes(rng, 53)
  b[:5] = a[:5]  # some exact overlaps
  ours = np.asarray(maybe_jit(B.box_iou, use_jit)(a, b))
  ref = tv_ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
  assert (ours > 0).sum() > 20  # the test is not vacuous


@jit_modes
def test_box_iou_zero_area_pairs_are_zero_not_nan(use_jit):
  rng = np.random.default_rng(1)
  a = random_boxes(rng, 20, zero_frac=0.5)
  a[:3] = 0.0  # padding rows
  b = random_boxes(rng, 25, zero_frac=0.5)
  b[:2] = 0.0
  b[2] = [5, 5, 5, 5]
  ours = np.asarray(maybe_jit(B.box_iou, use_jit)(a, b))
  assert np.isfinite(ours).all()
  ref = tv_ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  both_empty = (B.box_area(a)[:, None] == 0) & (B.box_area(b)[None, :] == 0)
  assert np.isnan(ref[both_empty]).all()  # torchvision divides 0 by 0 there
  np.testing.assert_array_equal(ours[both_empty], 0.0)
  np.testing.assert_allclose(ours[~both_empty], ref[~both_empty], rtol=1e-6, atol=1e-7)


def test_box_area():
  boxes = np.array([[0, 0, 10, 5], [1, 1, 1, 4], [2, 3, 1, 5]], np.float32)
  np.testing.assert_array_equal(np.asarray(B.box_area(boxes)), [50, 0, -2])
  ref = tv_ops.box_area(torch.from_numpy(boxes)).numpy()
  np.testing.assert_array_equal(np.asarray(B.box_area(boxes)), ref)


# ----------------------------------------------------------------------------------------------------- box coder


def coder_pairs(rng, n):
  """Reference boxes (n, 4) and target boxes (n, 4) near them, both with positive sizes."""
  ref = random_boxes(rng, n, max_xy=500, max_wh=300)
  jitter = rng.normal(0, 0.3, (n, 4)) * np.tile(ref[:, 2:] - ref[:, :2], 2)
  target = ref + jitter.astype(np.float32)
  target[:, 2:] = np.maximum(target[:, 2:], target[:, :2] + 1.0)
  return ref, target.astype(np.float32)


@pytest.mark.parametrize("weights", [B.ROI_BOX_WEIGHTS, B.RPN_BOX_WEIGHTS], ids=["roi", "rpn"])
@jit_modes
def test_encode_matches_torchvision(weights, use_jit):
  rng = np.random.default_rng(2)
  ref, target = coder_pairs(rng, 200)
  ours = np.asarray(maybe_jit(lambda t, r: B.encode_boxes(t, r, weights), use_jit)(target, ref))
  coder = tv_utils.BoxCoder(weights)
  expected = coder.encode_single(torch.from_numpy(target), torch.from_numpy(ref)).numpy()
  assert ours.shape == (200, 4) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_encode_hand_values():
  ref = np.array([[0, 0, 10, 20]], np.float32)  # centre (5, 10), size 10 x 20
  target = np.array([[2, 4, 22, 24]], np.float32)  # centre (12, 14), size 20 x 20
  d = np.asarray(B.encode_boxes(target, ref, (10.0, 10.0, 5.0, 5.0)))
  np.testing.assert_allclose(d, [[10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]], rtol=1e-6)


@pytest.mark.parametrize("weights", [B.ROI_BOX_WEIGHTS, B.RPN_BOX_WEIGHTS], ids=["roi", "rpn"])
@jit_modes
def test_decode_matches_torchvision(weights, use_jit):
  rng = np.random.default_rng(3)
  ref, _ = coder_pairs(rng, 150)
  deltas = (rng.normal(0, 1, (150, 4)) * np.array(weights) * 0.3).astype(np.float32)
  ours = np.asarray(maybe_jit(lambda d, r: B.decode_boxes(d, r, weights), use_jit)(deltas, ref))
  coder = tv_utils.BoxCoder(weights)
  expected = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(ref)).numpy()
  assert ours.shape == (150, 4) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-3)


@jit_modes
def test_decode_class_specific_matches_torchvision(use_jit):
  rng = np.random.default_rng(4)
  num_classes = 7
  ref, _ = coder_pairs(rng, 60)
  deltas = rng.normal(0, 2, (60, num_classes * 4)).astype(np.float32)
  weights = B.ROI_BOX_WEIGHTS
  ours = np.asarray(maybe_jit(lambda d, r: B.decode_boxes(d, r, weights), use_jit)(deltas, ref))
  expected = tv_utils.BoxCoder(weights).decode_single(torch.from_numpy(deltas), torch.from_numpy(ref)).numpy()
  assert ours.shape == (60, num_classes * 4)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-3)
  # Class k's slice is the decode of its own 4 deltas.
  k = 3
  single = np.asarray(B.decode_boxes(deltas[:, 4 * k : 4 * k + 4], ref, weights))
  np.testing.assert_allclose(ours[:, 4 * k : 4 * k + 4], single, rtol=1e-6, atol=1e-4)


@jit_modes
def test_decode_batched_leading_dims(use_jit):
  rng = np.random.default_rng(5)
  ref, _ = coder_pairs(rng, 24)
  deltas = rng.normal(0, 1, (24, 8)).astype(np.float32)
  flat = np.asarray(B.decode_boxes(deltas, ref, B.ROI_BOX_WEIGHTS))
  fn = maybe_jit(lambda d, r: B.decode_boxes(d, r, B.ROI_BOX_WEIGHTS), use_jit)
  batched = np.asarray(fn(deltas.reshape(2, 12, 8), ref.reshape(2, 12, 4)))
  np.testing.assert_allclose(batched.reshape(24, 8), flat, rtol=1e-6)


@jit_modes
def test_decode_clamps_huge_deltas(use_jit):
  ref = np.array([[0, 0, 16, 32], [100, 100, 110, 120]], np.float32)
  deltas = np.array([[0, 0, 1e4, 50.0], [0, 0, 1e30, -2.0]], np.float32)
  weights = (1.0, 1.0, 1.0, 1.0)
  ours = np.asarray(maybe_jit(lambda d, r: B.decode_boxes(d, r, weights), use_jit)(deltas, ref))
  assert np.isfinite(ours).all()
  # Width and height grow by at most exp(log(1000 / 16)) = 62.5 about the unchanged centre.
  np.testing.assert_allclose(ours[0], [8 - 500, 16 - 1000, 8 + 500, 16 + 1000], rtol=1e-5)
  h = 20 * math.exp(-2.0)
  np.testing.assert_allclose(ours[1], [105 - 312.5, 110 - h / 2, 105 + 312.5, 110 + h / 2], rtol=1e-5)
  expected = tv_utils.BoxCoder(weights).decode_single(torch.from_numpy(deltas), torch.from_numpy(ref)).numpy()
  np.testing.assert_allclose(ours, expected, rtol=1e-5)
  # The clamp applies after dividing by the weight: dw = 5 * 10 with ww = 5 is clamped like dw = 10.
  roi = np.asarray(B.decode_boxes(np.array([[0, 0, 50.0, 0]], np.float32), ref[:1], (10.0, 10.0, 5.0, 5.0)))
  np.testing.assert_allclose(roi[0, 2] - roi[0, 0], 16 * 62.5, rtol=1e-5)


@pytest.mark.parametrize("weights", [B.ROI_BOX_WEIGHTS, B.RPN_BOX_WEIGHTS], ids=["roi", "rpn"])
@jit_modes
def test_decode_inverts_encode(weights, use_jit):
  rng = np.random.default_rng(6)
  ref, target = coder_pairs(rng, 300)
  fn = maybe_jit(lambda t, r: B.decode_boxes(B.encode_boxes(t, r, weights), r, weights), use_jit)
  np.testing.assert_allclose(np.asarray(fn(target, ref)), target, rtol=1e-5, atol=2e-3)


# ------------------------------------------------------------------------------------------- clipping, formats


@jit_modes
def test_clip_boxes_scalar_size(use_jit):
  boxes = np.array([[-5, -3, 50, 40], [10, 10, 20, 20], [90, 70, 120, 95], [-10, -10, -1, -2]], np.float32)
  ours = np.asarray(maybe_jit(lambda b: B.clip_boxes(b, (60, 100)), use_jit)(boxes))
  expected = [[0, 0, 50, 40], [10, 10, 20, 20], [90, 60, 100, 60], [0, 0, 0, 0]]
  np.testing.assert_array_equal(ours, expected)
  ref = tv_ops.clip_boxes_to_image(torch.from_numpy(boxes), (60, 100)).numpy()
  np.testing.assert_array_equal(ours, ref)


@jit_modes
def test_clip_boxes_per_image_sizes(use_jit):
  rng = np.random.default_rng(7)
  boxes = rng.uniform(-50, 250, (3, 10, 4)).astype(np.float32)
  heights = np.array([100, 200, 150], np.float32)
  widths = np.array([120, 80, 240], np.float32)
  fn = maybe_jit(lambda b, h, w: B.clip_boxes(b, (h[:, None], w[:, None])), use_jit)
  ours = np.asarray(fn(boxes, heights, widths))
  for i in range(3):
    ref = tv_ops.clip_boxes_to_image(torch.from_numpy(boxes[i]), (int(heights[i]), int(widths[i]))).numpy()
    np.testing.assert_array_equal(ours[i], ref)


@jit_modes
def test_xyxy_xywh_round_trip(use_jit):
  xyxy = np.array([[1, 2, 4, 8], [0, 0, 0, 0], [10.5, 20.25, 11, 30]], np.float32)
  xywh = np.array([[1, 2, 3, 6], [0, 0, 0, 0], [10.5, 20.25, 0.5, 9.75]], np.float32)
  np.testing.assert_array_equal(np.asarray(maybe_jit(B.xyxy_to_xywh, use_jit)(xyxy)), xywh)
  np.testing.assert_array_equal(np.asarray(maybe_jit(B.xywh_to_xyxy, use_jit)(xywh)), xyxy)
  ref = tv_ops.box_convert(torch.from_numpy(xyxy), "xyxy", "xywh").numpy()
  np.testing.assert_array_equal(np.asarray(B.xyxy_to_xywh(xyxy)), ref)
  batched = np.stack([xyxy, xyxy + 1])
  np.testing.assert_array_equal(np.asarray(B.xywh_to_xyxy(B.xyxy_to_xywh(batched))), batched)
