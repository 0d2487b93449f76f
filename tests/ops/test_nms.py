"""Tests of mrcnn_jax.ops.nms against torchvision's CPU NMS (the oracle) and against cases worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.nms import batched_nms, nms

THRESHOLDS = (0.3, 0.5, 0.7)


def _torch():
  torch = pytest.importorskip("torch", reason="torch is the oracle for NMS parity (pip install mrcnn_jax[parity])")
  torchvision = pytest.importorskip("torchvision", reason="torchvision is the oracle for NMS parity")
  return torch, torchvision


def _torch_nms(boxes, scores, iou_threshold):
  torch, torchvision = _torch()
  return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou_threshold).numpy()


def _torch_batched_nms(boxes, scores, classes, iou_threshold):
  torch, torchvision = _torch()
  keep = torchvision.ops.batched_nms(
      torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes.astype(np.int64)), iou_threshold
  )
  return keep.numpy()


def _padded(kept, max_output_size):
  """torchvision's variable-length answer as the fixed-size one: the first max_output_size indices, then -1."""
  out = np.full((max_output_size,), -1, np.int32)
  m = min(max_output_size, len(kept))
  out[:m] = kept[:m]
  return out


def _clustered_boxes(seed, n, offset=0.0, grid=None):
  """(n, 4) float32 XYXY jittered copies of about n / 12 centres, and (n,) float32 scores in [0, 1).

  Copies of one centre overlap at IoU around 0.5-0.9, so every threshold suppresses a good share of the boxes.
  grid: snap coordinates to multiples of this (keeps torchvision's class-offset trick exact).
  """
  rng = np.random.default_rng(seed)
  num_centres = max(1, n // 12)
  centres = rng.uniform(0, 600, (num_centres, 2))
  sizes = rng.uniform(16, 160, (num_centres, 2))
  pick = rng.integers(0, num_centres, n)
  size = sizes[pick] * rng.lognormal(0.0, 0.15, (n, 2))
  ctr = centres[pick] + rng.normal(0.0, 0.08, (n, 2)) * sizes[pick]
  boxes = np.concatenate([ctr - size / 2, ctr + size / 2], axis=1) + offset
  if grid is not None:
    boxes = np.round(boxes / grid) * grid
  return boxes.astype(np.float32), rng.random(n).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Cases worked out by hand.
# ---------------------------------------------------------------------------------------------------------------


def test_hand_made_case():
  boxes = np.array(
      [
          [0, 0, 10, 10],  # 0: kept (nothing earlier overlaps it).
          [1, 0, 11, 10],  # 1: IoU with 0 is 90 / 110 = 0.82 -> suppressed at 0.5.
          [4, 0, 14, 10],  # 2: IoU with 0 is 60 / 140 = 0.43, with 1 is 70 / 130 = 0.54, but 1 is gone -> kept.
          [20, 20, 30, 30],  # 3: alone, highest score -> first.
      ],
      np.float32,
  )
  scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
  np.testing.assert_array_equal(nms(boxes, scores, 0.5, 6), [3, 0, 2, -1, -1, -1])
  np.testing.assert_array_equal(nms(boxes, scores, 0.85, 6), [3, 0, 1, 2, -1, -1])
  # With 1 and 2 in different classes, 2 is free of 1 anyway; 1 shares class 0 with box 0 and is suppressed.
  np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 0, 1, 0]), 0.3, 6), [3, 0, 2, -1, -1, -1])
  np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 1, 2, 0]), 0.3, 6), [3, 0, 1, 2, -1, -1])


def test_iou_exactly_at_threshold():
  # IoU = 3 / 10, which is float32(0.3) exactly. float32(0.3) is a bit above the double 0.3, so torchvision's CPU
  # kernel (float IoU > double threshold) suppresses box 1 at threshold 0.3; an IoU equal to the threshold does not.
  boxes = np.array([[0, 0, 10, 1], [0, 0, 3, 1]], np.float32)
  scores = np.array([1.0, 0.5], np.float32)
  np.testing.assert_array_equal(nms(boxes, scores, 0.3, 2), [0, -1])
  np.testing.assert_array_equal(nms(boxes, scores, float(np.float32(0.3)), 2), [0, 1])
  # IoU = 5 / 10 = 0.5 is exact in both precisions: not strictly greater, so kept.
  boxes = np.array([[0, 0, 10, 1], [0, 0, 5, 1]], np.float32)
  np.testing.assert_array_equal(nms(boxes, scores, 0.5, 2), [0, 1])


def test_equal_scores_keep_index_order():
  # Copies of two boxes, all with one score: boxes are visited in index order, so the first copy of each wins.
  a, b = [0, 0, 10, 10], [50, 50, 60, 60]
  boxes = np.array([b, a, a, b, a, a], np.float32)
  scores = np.ones((6,), np.float32)
  np.testing.assert_array_equal(nms(boxes, scores, 0.5, 4), [0, 1, -1, -1])


def test_empty_and_all_invalid():
  boxes, scores = _clustered_boxes(0, 40)
  np.testing.assert_array_equal(nms(boxes, scores, 0.5, 8, valid=np.zeros((40,), bool)), np.full((8,), -1))
  np.testing.assert_array_equal(nms(boxes, np.full((40,), -np.inf, np.float32), 0.5, 8), np.full((8,), -1))
  np.testing.assert_array_equal(nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5, 8), np.full((8,), -1))
  classes = np.zeros((40,), np.int32)
  np.testing.assert_array_equal(
      batched_nms(boxes, scores, classes, 0.5, 8, valid=np.zeros((40,), bool)), np.full((8,), -1)
  )


# ---------------------------------------------------------------------------------------------------------------
# Parity with torchvision.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,n", [(0, 300), (1, 640), (2, 1000)])
@pytest.mark.parametrize("iou_threshold", THRESHOLDS)
def test_matches_torchvision(seed, n, iou_threshold):
  boxes, scores = _clustered_boxes(seed, n)
  expected = _torch_nms(boxes, scores, iou_threshold)
  # Suppression must really happen, or the comparison proves little.
  assert len(expected) < 0.6 * n
  np.testing.assert_array_equal(nms(boxes, scores, iou_threshold, n), _padded(expected, n))


@pytest.mark.parametrize("iou_threshold", THRESHOLDS)
def test_max_output_size_smaller_than_kept_gives_the_prefix(iou_threshold):
  boxes, scores = _clustered_boxes(3, 600)
  expected = _torch_nms(boxes, scores, iou_threshold)
  max_output_size = len(expected) // 2
  out = nms(boxes, scores, iou_threshold, max_output_size, tile_size=64)
  np.testing.assert_array_equal(out, expected[:max_output_size])


@pytest.mark.parametrize("iou_threshold", THRESHOLDS)
def test_tied_scores(iou_threshold):
  boxes, scores = _clustered_boxes(4, 500)
  scores = np.round(scores, 1)  # 11 distinct values: many ties, broken by index.
  expected = _torch_nms(boxes, scores, iou_threshold)
  assert len(expected) < 0.6 * 500
  np.testing.assert_array_equal(nms(boxes, scores, iou_threshold, 500, tile_size=64), _padded(expected, 500))


def test_padding_by_score_and_by_valid():
  boxes, scores = _clustered_boxes(5, 400)
  rng = np.random.default_rng(5)
  scores[rng.random(400) < 0.2] = -np.inf
  scores[rng.random(400) < 0.05] = np.nan
  valid = rng.random(400) > 0.2
  real = np.flatnonzero(np.isfinite(scores) & valid)
  # Padding is simply absent: torchvision on the real boxes alone, mapped back to the full indexing.
  expected = real[_torch_nms(boxes[real], scores[real], 0.5)]
  assert len(expected) < 0.6 * len(real)
  np.testing.assert_array_equal(nms(boxes, scores, 0.5, 400, valid=valid, tile_size=64), _padded(expected, 400))


def test_zero_area_and_negative_coordinates():
  boxes, scores = _clustered_boxes(6, 400, offset=-300.0)  # partly left of / above any image
  rng = np.random.default_rng(6)
  flat = rng.random(400) < 0.15
  boxes[flat, 2] = boxes[flat, 0]  # zero width
  point = rng.random(400) < 0.05
  boxes[point, 2:] = boxes[point, :2]  # a point
  boxes[-3:] = boxes[-4]  # repeated copies of one box
  assert (boxes < 0).any()
  for iou_threshold in THRESHOLDS:
    expected = _torch_nms(boxes, scores, iou_threshold)
    np.testing.assert_array_equal(nms(boxes, scores, iou_threshold, 400), _padded(expected, 400))


@pytest.mark.parametrize("n,tile_size", [(300, 256), (100, 256), (1000, 16), (1000, 1024)])
def test_tile_sizes(n, tile_size):
  boxes, scores = _clustered_boxes(7, n)
  for iou_threshold in (0.5, 0.7):
    expected = _padded(_torch_nms(boxes, scores, iou_threshold), n)
    np.testing.assert_array_equal(nms(boxes, scores, iou_threshold, n, tile_size=tile_size), expected)


def test_small_tiles_equal_large_tiles():
  # Independent of the oracle: many tiles (and a buffer read in many chunks) give the same answer as one tile.
  boxes, scores = _clustered_boxes(8, 800)
  scores = np.round(scores, 2)
  for iou_threshold in THRESHOLDS:
    small = nms(boxes, scores, iou_threshold, 300, tile_size=16)
    large = nms(boxes, scores, iou_threshold, 300, tile_size=800)
    np.testing.assert_array_equal(small, large)


@pytest.mark.parametrize("n", [600, 1500])  # torchvision offsets boxes per class up to 1000 boxes, loops above
@pytest.mark.parametrize("iou_threshold", THRESHOLDS)
def test_batched_matches_torchvision(n, iou_threshold):
  # On a 1/16 grid the class offsets of torchvision's coordinate trick are exact, so its IoUs equal ours.
  boxes, scores = _clustered_boxes(9, n, grid=1 / 16)
  classes = np.random.default_rng(9).integers(0, 5, n).astype(np.int32)
  expected = _torch_batched_nms(boxes, scores, classes, iou_threshold)
  assert len(expected) < 0.8 * n
  # Classes really matter: plain NMS keeps fewer.
  assert len(_torch_nms(boxes, scores, iou_threshold)) < len(expected)
  out = batched_nms(boxes, scores, classes, iou_threshold, n, tile_size=128)
  np.testing.assert_array_equal(out, _padded(expected, n))


def test_batched_tied_scores_match_per_class_nms():
  # torchvision's merge of the classes does not order equal scores; per-class NMS merged by a stable sort does.
  boxes, scores = _clustered_boxes(10, 500)
  scores = np.round(scores, 1)
  classes = np.random.default_rng(10).integers(0, 4, 500).astype(np.int32)
  kept = np.concatenate([np.flatnonzero(classes == c)[_torch_nms(boxes[classes == c], scores[classes == c], 0.5)]
                         for c in range(4)])
  expected = kept[np.lexsort((kept, -scores[kept]))]
  np.testing.assert_array_equal(batched_nms(boxes, scores, classes, 0.5, 500, tile_size=64), _padded(expected, 500))


def test_jit_with_traced_threshold():
  boxes, scores = _clustered_boxes(11, 500)
  traces = []

  @jax.jit
  def run(boxes, scores, iou_threshold):
    traces.append(None)  # runs once per trace, not per call
    return nms(boxes, scores, iou_threshold, 200, tile_size=64)

  for iou_threshold in THRESHOLDS:
    out = run(jnp.asarray(boxes), jnp.asarray(scores), jnp.float32(iou_threshold))
    np.testing.assert_array_equal(out, _padded(_torch_nms(boxes, scores, iou_threshold), 200))
  # One program serves every threshold.
  assert len(traces) == 1


def test_five_thousand_boxes():
  boxes, scores = _clustered_boxes(12, 5000)
  expected = _torch_nms(boxes, scores, 0.7)
  assert len(expected) < 0.6 * 5000
  np.testing.assert_array_equal(nms(boxes, scores, 0.7, 1000, tile_size=256), _padded(expected, 1000))
