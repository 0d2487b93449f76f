"""Matcher against torchvision's Matcher and hand cases; balanced sampling counts, distinctness and randomness."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.matching import Matcher, match, sample_balanced

RPN = dict(thresholds=(0.3, 0.7), labels=(0, -1, 1))

# Jitted once per static configuration: op-by-op eager dispatch would make up most of the test time.
sample = jax.jit(
    sample_balanced, static_argnames=("num_samples", "positive_fraction", "positive_label", "negative_label")
)


def random_boxes(rng, n, max_xy=200.0, min_wh=5.0, max_wh=80.0):
  xy = rng.uniform(0, max_xy, (n, 2))
  wh = rng.uniform(min_wh, max_wh, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def random_iou(seed, num_gt=6, num_pred=400, far_gt=True):
  """(G, N) float32 IoU of random GT and prediction boxes; optionally one GT that overlaps no prediction."""
  torch = pytest.importorskip("torch")
  from torchvision.ops import box_iou

  rng = np.random.default_rng(seed)
  gt = random_boxes(rng, num_gt)
  pred = random_boxes(rng, num_pred)
  pred[: num_gt * 3] = gt.repeat(3, 0) + rng.normal(0, 3, (num_gt * 3, 4)).astype(np.float32)  # some good matches
  if far_gt:
    gt[-1] = [1000, 1000, 1040, 1030]
  return box_iou(torch.from_numpy(gt), torch.from_numpy(pred)).numpy()


def torchvision_match(quality, high, low, allow_low_quality_matches):
  """torchvision's Matcher, its codes mapped to (matches >= 0 where labelled 1, labels in {0, -1, 1})."""
  torch = pytest.importorskip("torch")
  from torchvision.models.detection._utils import Matcher as TVMatcher

  codes = TVMatcher(high, low, allow_low_quality_matches)(torch.from_numpy(quality)).numpy()
  labels = np.where(codes >= 0, 1, np.where(codes == TVMatcher.BELOW_LOW_THRESHOLD, 0, -1))
  return codes, labels


# ------------------------------------------------------------------------------------------ torchvision parity


@pytest.mark.parametrize("allow_low", [False, True], ids=["strict", "low_quality"])
@pytest.mark.parametrize("high, low", [(0.7, 0.3), (0.5, 0.5)], ids=["rpn", "roi"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_matches_torchvision(seed, high, low, allow_low):
  quality = random_iou(seed, far_gt=seed == 0)
  codes, tv_labels = torchvision_match(quality, high, low, allow_low)
  thresholds, labels = (low, high), (0, -1, 1)
  matches, match_labels = jax.jit(match, static_argnums=(1, 2, 3))(quality, thresholds, labels, allow_low)
  matches, match_labels = np.asarray(matches), np.asarray(match_labels)
  assert matches.dtype == np.int32 and match_labels.dtype == np.int32 and matches.shape == (quality.shape[1],)
  np.testing.assert_array_equal(match_labels, tv_labels)
  np.testing.assert_array_equal(matches[codes >= 0], codes[codes >= 0])
  np.testing.assert_array_equal(matches, quality.argmax(0))
  assert (match_labels == 1).sum() >= 5  # not vacuous
  if allow_low and seed == 0:
    # The GT that overlaps nothing turned every prediction with IoU 0 to it positive, in torchvision as here.
    assert (match_labels == 1).sum() > 0.5 * quality.shape[1]


@pytest.mark.parametrize("allow_low", [False, True], ids=["strict", "low_quality"])
def test_padded_gt_rows_change_nothing(allow_low):
  quality = random_iou(3, far_gt=False)
  num_gt, num_pred = quality.shape
  codes, tv_labels = torchvision_match(quality, 0.7, 0.3, allow_low)
  # Interleave padding rows that would win everything if they counted.
  rng = np.random.default_rng(3)
  padded = rng.uniform(0.9, 1.0, (2 * num_gt, num_pred)).astype(np.float32)
  padded[1::2] = quality
  gt_valid = np.zeros(2 * num_gt, bool)
  gt_valid[1::2] = True
  matches, match_labels = match(padded, RPN["thresholds"], RPN["labels"], allow_low, gt_valid=gt_valid)
  np.testing.assert_array_equal(np.asarray(match_labels), tv_labels)
  np.testing.assert_array_equal(np.asarray(matches), 2 * quality.argmax(0) + 1)


# ---------------------------------------------------------------------------------------------------- hand cases


def test_thresholds_are_half_open_intervals():
  quality = np.array([[0.0, 0.29, 0.3, 0.5, 0.69, 0.7, 1.0]], np.float32)
  _, labels = match(quality, RPN["thresholds"], RPN["labels"], False)
  np.testing.assert_array_equal(np.asarray(labels), [0, 0, -1, -1, -1, 1, 1])
  _, labels = match(quality, (0.5, 0.5), (0, -1, 1), False)
  np.testing.assert_array_equal(np.asarray(labels), [0, 0, 0, 1, 1, 1, 1])
  _, labels = match(quality, (0.4, 0.6), (-1, 0, 1), False)  # any label order
  np.testing.assert_array_equal(np.asarray(labels), [-1, -1, -1, 0, 1, 1, 1])


def test_ties_go_to_the_first_gt():
  quality = np.array([[0.8, 0.2, 0.0], [0.8, 0.5, 0.0], [0.1, 0.5, 0.0]], np.float32)
  matches, labels = match(quality, RPN["thresholds"], RPN["labels"], False)
  np.testing.assert_array_equal(np.asarray(matches), [0, 1, 0])
  np.testing.assert_array_equal(np.asarray(labels), [1, -1, 0])


def test_low_quality_rescue():
  # GT 1's best IoU is 0.4, reached by predictions 1 and 2 (a tie): both become positive.
  quality = np.array([[0.9, 0.1, 0.0, 0.0], [0.2, 0.4, 0.4, 0.35]], np.float32)
  matches, labels = match(quality, RPN["thresholds"], RPN["labels"], False)
  np.testing.assert_array_equal(np.asarray(labels), [1, -1, -1, -1])
  matches, labels = match(quality, RPN["thresholds"], RPN["labels"], True)
  np.testing.assert_array_equal(np.asarray(labels), [1, 1, 1, -1])
  np.testing.assert_array_equal(np.asarray(matches), [0, 1, 1, 1])


def test_low_quality_rescue_keeps_the_argmax_match():
  # GT 1's best prediction (1, IoU 0.4) overlaps GT 0 more (0.5): it turns positive but stays matched to GT 0.
  quality = np.array([[0.9, 0.5, 0.0], [0.2, 0.4, 0.1]], np.float32)
  matches, labels = match(quality, RPN["thresholds"], RPN["labels"], True)
  np.testing.assert_array_equal(np.asarray(labels), [1, 1, 0])
  np.testing.assert_array_equal(np.asarray(matches), [0, 0, 1])
  codes, _ = torchvision_match(quality, 0.7, 0.3, True)
  np.testing.assert_array_equal(codes, [0, 0, -1])


def test_low_quality_gt_with_zero_best_quality():
  # GT 1 overlaps nothing: its "best" predictions are all those with quality 0 to it, and all become positive.
  quality = np.array([[0.9, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  matches, labels = match(quality, RPN["thresholds"], RPN["labels"], True)
  np.testing.assert_array_equal(np.asarray(labels), [1, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(matches), [0, 0, 0, 0])
  codes, _ = torchvision_match(quality, 0.7, 0.3, True)
  np.testing.assert_array_equal(codes, [0, 0, 0, 0])


def test_padded_gt_never_matches_nor_rescues():
  quality = np.array([[0.9, 0.2, 0.1], [0.95, 0.99, 0.0], [0.1, 0.6, 0.25]], np.float32)
  gt_valid = np.array([True, False, True])
  for allow_low in (False, True):
    matches, labels = match(quality, RPN["thresholds"], RPN["labels"], allow_low, gt_valid=gt_valid)
    np.testing.assert_array_equal(np.asarray(matches), [0, 2, 2])
    # With low-quality matches GT 2 rescues prediction 1 (0.6); padded GT 1 rescues nothing.
    np.testing.assert_array_equal(np.asarray(labels), [1, 1, 0] if allow_low else [1, -1, 0])


def test_no_valid_gt():
  quality = np.array([[0.9, 0.2, 0.0], [0.5, 0.99, 0.0]], np.float32)
  for allow_low in (False, True):
    matches, labels = match(quality, RPN["thresholds"], RPN["labels"], allow_low, gt_valid=np.zeros(2, bool))
    np.testing.assert_array_equal(np.asarray(matches), [0, 0, 0])
    np.testing.assert_array_equal(np.asarray(labels), [0, 0, 0])
    _, labels = match(quality, (0.4, 0.6), (-1, 0, 1), allow_low, gt_valid=np.zeros(2, bool))
    np.testing.assert_array_equal(np.asarray(labels), [-1, -1, -1])  # labels[0], whatever it is
  matches, labels = match(np.zeros((0, 3), np.float32), RPN["thresholds"], RPN["labels"], True)
  np.testing.assert_array_equal(np.asarray(matches), [0, 0, 0])
  np.testing.assert_array_equal(np.asarray(labels), [0, 0, 0])


def test_matcher_object_and_jit():
  quality = random_iou(4)
  matcher = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)
  gt_valid = np.ones(quality.shape[0], bool)
  expected = match(quality, (0.3, 0.7), (0, -1, 1), True)
  eager = matcher(quality, gt_valid)
  jitted = jax.jit(matcher)(quality, gt_valid)
  static = jax.jit(lambda m, q: m(q), static_argnums=0)(matcher, quality)  # hashable: a static argument
  for got in (eager, jitted, static):
    for a, b in zip(got, expected):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Batched over images with vmap.
  gt_valid2 = np.ones((2, quality.shape[0]), bool)
  gt_valid2[1, -2:] = False
  batched = jax.vmap(matcher)(np.stack([quality, quality[::-1]]), gt_valid2)
  for i, q in enumerate([quality, quality[::-1]]):
    for a, b in zip(batched, matcher(q, gt_valid2[i])):
      np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))


@pytest.mark.parametrize(
    "thresholds, labels, message",
    [((0.3, 0.7), (0, 1), "len"), ((0.7, 0.3), (0, -1, 1), "non-decreasing"), ((0.5,), (0, 2), "labels must")],
)
def test_matcher_validation(thresholds, labels, message):
  with pytest.raises(ValueError, match=message):
    Matcher(thresholds, labels)
  with pytest.raises(ValueError, match=message):
    match(np.zeros((2, 3), np.float32), thresholds, labels, False)


# ------------------------------------------------------------------------------------------------------ sampling


def make_labels(num_pos, num_neg, num_ignore, seed=0):
  labels = np.array([1] * num_pos + [0] * num_neg + [-1] * num_ignore, np.int32)
  return np.random.default_rng(seed).permutation(labels)


def check_sample(indices, sample_valid, labels, num_pos, num_neg, valid=None):
  indices, sample_valid = np.asarray(indices), np.asarray(sample_valid)
  num_samples = indices.shape[0]
  assert indices.dtype == np.int32 and sample_valid.dtype == bool
  np.testing.assert_array_equal(sample_valid, np.arange(num_samples) < num_pos + num_neg)
  drawn = indices[: num_pos + num_neg]
  assert len(set(drawn.tolist())) == len(drawn)  # without replacement
  assert (labels[drawn[:num_pos]] == 1).all()
  assert (labels[drawn[num_pos:]] == 0).all()
  if valid is not None:
    assert valid[drawn].all()
  np.testing.assert_array_equal(indices[num_pos + num_neg :], 0)


@pytest.mark.parametrize(
    "num_pos, num_neg, num_samples, fraction, expected_pos, expected_neg",
    [
        (40, 300, 64, 0.25, 16, 48),  # both plentiful: the quota
        (5, 300, 64, 0.5, 5, 59),  # few positives: negatives fill the rest
        (3, 7, 32, 0.5, 3, 7),  # few of both: padding
        (0, 50, 16, 0.5, 0, 16),  # no positives
        (50, 0, 16, 0.5, 8, 0),  # no negatives: positives stay at the quota
        (10, 10, 16, 0.0, 0, 10),  # fraction 0
        (10, 10, 16, 1.0, 10, 6),
        (6, 6, 512, 0.25, 6, 6),  # num_samples larger than N
        (300, 300, 15, 0.33, 4, 11),  # int(15 * 0.33) = 4
    ],
)
def test_sample_counts(num_pos, num_neg, num_samples, fraction, expected_pos, expected_neg):
  labels = make_labels(num_pos, num_neg, 20)
  indices, sample_valid = sample(jax.random.key(0), labels, num_samples=num_samples, positive_fraction=fraction)
  assert indices.shape == (num_samples,) and sample_valid.shape == (num_samples,)
  check_sample(indices, sample_valid, labels, expected_pos, expected_neg)


def test_sample_respects_valid_and_custom_labels():
  labels = make_labels(30, 30, 30, seed=1)
  valid = np.random.default_rng(2).random(90) < 0.5
  num_pos, num_neg = ((labels == 1) & valid).sum(), ((labels == 0) & valid).sum()
  indices, sample_valid = sample(jax.random.key(3), labels, num_samples=64, positive_fraction=0.5, valid=valid)
  check_sample(indices, sample_valid, labels, min(num_pos, 32), min(num_neg, 64 - min(num_pos, 32)), valid)
  # Class labels: foreground 7 against background 0, ignoring the rest.
  classes = np.where(labels == 1, 7, labels)
  indices2, _ = sample(jax.random.key(3), classes, num_samples=64, positive_fraction=0.5, valid=valid,
                       positive_label=7)
  np.testing.assert_array_equal(np.asarray(indices2), np.asarray(indices))
  indices3, valid3 = sample(
      jax.random.key(3), labels, num_samples=64, positive_fraction=0.5, positive_label=0, negative_label=-1
  )
  check_sample(indices3, valid3, labels + 1, 30, 30)


def test_sample_deterministic_per_key():
  labels = make_labels(50, 500, 10)
  fn = jax.jit(sample_balanced, static_argnums=(2, 3))
  a = fn(jax.random.key(7), labels, 128, 0.25)
  b = fn(jax.random.key(7), labels, 128, 0.25)
  c = fn(jax.random.key(8), labels, 128, 0.25)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
  eager = sample_balanced(jax.random.key(7), labels, 128, 0.25)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(eager[0]))


def test_sample_is_roughly_uniform():
  """200 draws of half of the 20 positives and 10 of the 40 negatives: every one is drawn, none far too often.

  A given positive is missed by all draws with probability 2**-200; it is drawn in 100 +- 7 draws (one standard
  deviation), so the bounds below sit at over 8 standard deviations.
  """
  labels = make_labels(20, 40, 0, seed=4)
  keys = jax.random.split(jax.random.key(11), 200)
  draw = jax.jit(jax.vmap(functools.partial(sample_balanced, num_samples=20, positive_fraction=0.5), (0, None)))
  indices, sample_valid = draw(keys, labels)
  indices, sample_valid = np.asarray(indices), np.asarray(sample_valid)
  assert sample_valid.all()
  pos_counts = np.bincount(indices[:, :10].reshape(-1), minlength=60)[labels == 1]
  neg_counts = np.bincount(indices[:, 10:].reshape(-1), minlength=60)[labels == 0]
  assert pos_counts.sum() == 2000 and neg_counts.sum() == 2000
  assert pos_counts.min() >= 40 and pos_counts.max() <= 160
  assert neg_counts.min() >= 10 and neg_counts.max() <= 100  # mean 50, standard deviation 6.1
  # The order within the positive slots is random too: slot 0 is not always the same prediction.
  assert len(set(indices[:, 0].tolist())) > 10


def test_sample_vmapped_matches_single():
  labels = np.stack([make_labels(10, 100, 5, seed=s) for s in range(3)])
  keys = jax.random.split(jax.random.key(5), 3)
  fn = jax.jit(jax.vmap(lambda k, l: sample_balanced(k, l, 32, 0.25)))
  indices, sample_valid = fn(keys, labels)
  for i in range(3):
    single = sample(keys[i], labels[i], num_samples=32, positive_fraction=0.25)
    np.testing.assert_array_equal(np.asarray(indices[i]), np.asarray(single[0]))
    check_sample(indices[i], sample_valid[i], labels[i], 8, 24)


def test_match_then_sample_under_jit():
  quality = random_iou(6, far_gt=False)

  @jax.jit
  def step(key, q):
    _, labels = match(q, RPN["thresholds"], RPN["labels"], True)
    return labels, sample_balanced(key, labels, 64, 0.5)

  labels, (indices, sample_valid) = step(jax.random.key(0), quality)
  labels = np.asarray(labels)
  num_pos = min((labels == 1).sum(), 32)
  check_sample(indices, sample_valid, labels, num_pos, min((labels == 0).sum(), 64 - num_pos))


def test_sample_validation():
  with pytest.raises(ValueError, match="num_samples"):
    sample_balanced(jax.random.key(0), jnp.zeros(4, jnp.int32), 0, 0.5)
  with pytest.raises(ValueError, match="positive_fraction"):
    sample_balanced(jax.random.key(0), jnp.zeros(4, jnp.int32), 4, 1.5)
