"""Matching predictions (anchors, proposals) to ground truth, and sampling a fixed number of them for the losses.

`match` is Detectron2's `Matcher` (torchvision's `Matcher` is the same rule with its labels folded into the match
indices) on fixed shapes: padded ground-truth rows are masked out instead of removed. `sample_balanced` is
Detectron2's `subsample_labels` with a fixed output size: the positives and negatives it picks come first and the
rest is padding marked invalid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _check_matcher_args(thresholds, labels):
  thresholds = tuple(float(t) for t in thresholds)
  labels = tuple(int(l) for l in labels)
  if len(labels) != len(thresholds) + 1:
    raise ValueError(f"need len(labels) == len(thresholds) + 1, got thresholds {thresholds} and labels {labels}")
  if any(lo > hi for lo, hi in zip(thresholds[:-1], thresholds[1:])):
    raise ValueError(f"thresholds must be non-decreasing, got {thresholds}")
  if any(l not in (-1, 0, 1) for l in labels):
    raise ValueError(f"labels must be -1 (ignore), 0 (negative) or 1 (positive), got {labels}")
  return thresholds, labels


def match(
    quality,
    thresholds: Sequence[float],
    labels: Sequence[int],
    allow_low_quality_matches: bool,
    *,
    gt_valid=None,
):
  """Assigns every prediction its best ground truth and a label from the quality of that match.

  With thresholds (t_1, ..., t_k) and labels (l_0, ..., l_k), a prediction whose best quality q lies in
  [t_i, t_{i+1}) gets label l_i, with t_0 = -inf and t_{k+1} = +inf; e.g. the RPN's thresholds (0.3, 0.7) and labels
  (0, -1, 1): below 0.3 negative, from 0.7 positive, in between ignored.

  With `allow_low_quality_matches`, for every valid ground truth each prediction whose quality equals that ground
  truth's highest quality (ties included) is relabelled 1, so that no ground truth is left without a positive. As in
  Detectron2 and torchvision, such a prediction keeps its argmax match, which may be another ground truth; and a
  ground truth that overlaps nothing (highest quality 0) turns every prediction of quality 0 with it positive.

  Args:
    quality: (G, N) float, e.g. IoU of G ground-truth boxes with N predictions; values >= 0.
    thresholds: k non-decreasing floats (static).
    labels: k + 1 ints in {-1, 0, 1} (static).
    allow_low_quality_matches: bool (static).
    gt_valid: optional (G,) bool; False rows (padding) never match nor take part in low-quality matching.

  Returns:
    matches: (N,) int32, index of the best valid ground truth (the first on ties); 0 if no ground truth is valid.
    match_labels: (N,) int32, values from `labels`; labels[0] everywhere if no ground truth is valid.
  """
  thresholds, labels = _check_matcher_args(thresholds, labels)
  if quality.ndim != 2:
    raise ValueError(f"quality must be (G, N), got shape {quality.shape}")
  num_gt, num_pred = quality.shape
  if num_gt == 0:
    return jnp.zeros((num_pred,), jnp.int32), jnp.full((num_pred,), labels[0], jnp.int32)
  if gt_valid is None:
    gt_valid = jnp.ones((num_gt,), bool)
  gt_valid = gt_valid.astype(bool)
  any_valid = jnp.any(gt_valid)

  masked = jnp.where(gt_valid[:, None], quality, -jnp.inf)
  # argmax takes the first maximum, as torch.max(dim=0) does.
  matches = jnp.argmax(masked, axis=0).astype(jnp.int32)
  matched_vals = jnp.max(masked, axis=0)

  # The bucket [t_i, t_{i+1}) that holds q is the number of thresholds <= q. With equal thresholds the empty
  # bucket is skipped, which is what Detectron2's in-order overwrite amounts to.
  bucket = jnp.zeros((num_pred,), jnp.int32)
  for t in thresholds:
    bucket += (matched_vals >= t).astype(jnp.int32)
  match_labels = jnp.asarray(labels, jnp.int32)[bucket]

  if allow_low_quality_matches:
    highest_per_gt = jnp.max(masked, axis=1)
    is_highest = (masked == highest_per_gt[:, None]) & gt_valid[:, None]
    match_labels = jnp.where(jnp.any(is_highest, axis=0), 1, match_labels)

  matches = jnp.where(any_valid, matches, 0)
  match_labels = jnp.where(any_valid, match_labels, labels[0])
  return matches, match_labels


@dataclasses.dataclass(frozen=True)
class Matcher:
  """`match` with its settings bound, for configs: Matcher((0.3, 0.7), (0, -1, 1), True)(iou, gt_valid).

  Frozen and hashable, so it can be a static argument or a field of a Flax module.
  """

  thresholds: tuple[float, ...]
  labels: tuple[int, ...]
  allow_low_quality_matches: bool = False

  def __post_init__(self):
    thresholds, labels = _check_matcher_args(self.thresholds, self.labels)
    object.__setattr__(self, "thresholds", thresholds)
    object.__setattr__(self, "labels", labels)
    object.__setattr__(self, "allow_low_quality_matches", bool(self.allow_low_quality_matches))

  def __call__(self, quality, gt_valid=None):
    """quality: (G, N); gt_valid: optional (G,) bool -> (matches (N,) int32, match_labels (N,) int32)."""
    return match(quality, self.thresholds, self.labels, self.allow_low_quality_matches, gt_valid=gt_valid)


def _random_subset(key, member, k):
  """Indices (k,) int32 of min(k, #member) members drawn uniformly without replacement, in random order, first.

  Each member gets a random 31-bit priority and non-members -1, so the top k priorities are a uniform random subset
  of the members (ties, rare with 31 bits, go to the lower index). Slots past the member count hold non-members.
  """
  priority = (jax.random.bits(key, member.shape, jnp.uint32) >> 1).astype(jnp.int32)
  priority = jnp.where(member, priority, -1)
  _, indices = lax.top_k(priority, k)
  return indices.astype(jnp.int32)


def sample_balanced(
    key,
    match_labels,
    num_samples: int,
    positive_fraction: float,
    *,
    valid=None,
    positive_label: int = 1,
    negative_label: int = 0,
):
  """Draws up to num_samples predictions, at most a positive_fraction of them positive, with a fixed output size.

  As Detectron2's `subsample_labels`: num_pos = min(int(num_samples * positive_fraction), #positives) positives and
  num_neg = min(num_samples - num_pos, #negatives) negatives, each set drawn uniformly without replacement. For a
  batch, vmap over key, match_labels and valid.

  Args:
    key: a jax.random key.
    match_labels: (N,) int labels, e.g. from `match`; -1 (ignored) and any other value is never drawn.
    num_samples: output size (static), e.g. 256 anchors or 512 RoIs per image.
    positive_fraction: largest fraction of positives (static), e.g. 0.5 or 0.25.
    valid: optional (N,) bool; False entries are never drawn (e.g. anchors crossing the image border, padding).
    positive_label, negative_label: the label values of the two groups (static).

  Returns:
    indices: (num_samples,) int32 into N: num_pos positives first, then num_neg negatives, then padding (0).
    sample_valid: (num_samples,) bool, True on the num_pos + num_neg drawn slots.
  """
  num_samples = int(num_samples)
  if num_samples < 1:
    raise ValueError(f"num_samples must be positive, got {num_samples}")
  if not 0.0 <= positive_fraction <= 1.0:
    raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
  if match_labels.ndim != 1:
    raise ValueError(f"match_labels must be (N,), got shape {match_labels.shape}")
  num = match_labels.shape[0]
  if valid is None:
    valid = jnp.ones((num,), bool)
  positive = (match_labels == positive_label) & valid
  negative = (match_labels == negative_label) & valid

  max_pos = int(num_samples * positive_fraction)
  num_pos = jnp.minimum(jnp.sum(positive, dtype=jnp.int32), max_pos)
  num_neg = jnp.minimum(jnp.sum(negative, dtype=jnp.int32), num_samples - num_pos)

  key_pos, key_neg = jax.random.split(key)
  # top_k needs k <= N; slots beyond N are padding anyway.
  pos_indices = _random_subset(key_pos, positive, min(max_pos, num)) if max_pos > 0 else jnp.zeros((0,), jnp.int32)
  neg_indices = _random_subset(key_neg, negative, min(num_samples, num))

  slot = jnp.arange(num_samples, dtype=jnp.int32)
  pos_part = jnp.pad(pos_indices, (0, num_samples - pos_indices.shape[0]))
  neg_part = jnp.pad(neg_indices, (0, num_samples - neg_indices.shape[0]))
  neg_part = neg_part[jnp.clip(slot - num_pos, 0, num_samples - 1)]
  is_pos = slot < num_pos
  sample_valid = slot < num_pos + num_neg
  indices = jnp.where(is_pos, pos_part, jnp.where(sample_valid, neg_part, 0))
  return indices, sample_valid
