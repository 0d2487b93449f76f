"""Keypoint targets and loss_keypoint against torchvision's `keypoints_to_heatmap` / `keypointrcnn_loss`.

Targets must agree exactly (including keypoints outside their RoI, on its right / bottom edge, one float below it,
and unlabeled ones); the loss and its gradient to 1e-5 given the same logits, proposals and matched keypoints.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import losses

torch = pytest.importorskip("torch", reason="torchvision is the parity oracle; install the `parity` extra")
torchvision = pytest.importorskip("torchvision", reason="torchvision is the parity oracle")
tv_roi_heads = torchvision.models.detection.roi_heads

S = 56
K = 17


def _rois(rng, n):
  """(n, 4) float32 boxes with fractional corners, some thin, inside a 640 x 480 image."""
  x1 = rng.uniform(0, 500, n)
  y1 = rng.uniform(0, 400, n)
  w = np.where(rng.random(n) < 0.2, rng.uniform(0.5, 4, n), rng.uniform(8, 200, n))
  h = np.where(rng.random(n) < 0.2, rng.uniform(0.5, 4, n), rng.uniform(8, 200, n))
  return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def _keypoints(rng, rois, k=K):
  """(R, k, 3) float32 keypoints for each RoI: mostly inside, some outside, some exactly on an edge or one ulp inside
  the right / bottom edge, a third unlabeled (visibility 0 at (0, 0), COCO's convention)."""
  r = len(rois)
  x1, y1, x2, y2 = (rois[:, i, None] for i in range(4))
  # Uniform over the RoI widened by 20% on each side: about a quarter fall outside.
  u = rng.uniform(-0.2, 1.2, (r, k))
  v = rng.uniform(-0.2, 1.2, (r, k))
  x = (x1 + u * (x2 - x1)).astype(np.float32)
  y = (y1 + v * (y2 - y1)).astype(np.float32)
  pick = rng.random((r, k))
  x = np.where(pick < 0.08, np.broadcast_to(x2, x.shape), x)  # on the right edge
  y = np.where((pick >= 0.08) & (pick < 0.16), np.broadcast_to(y2, y.shape), y)  # on the bottom edge
  both = (pick >= 0.16) & (pick < 0.2)  # on the bottom-right corner
  x = np.where(both, np.broadcast_to(x2, x.shape), x)
  y = np.where(both, np.broadcast_to(y2, y.shape), y)
  below = (pick >= 0.2) & (pick < 0.26)  # one float below the right edge: floor may land on S (outside)
  x = np.where(below, np.nextafter(np.broadcast_to(x2, x.shape), np.float32(-np.inf)), x)
  left = (pick >= 0.26) & (pick < 0.3)  # on the left / top edge: cell 0
  x = np.where(left, np.broadcast_to(x1, x.shape), x)
  y = np.where(left, np.broadcast_to(y1, y.shape), y)
  vis = rng.choice(np.array([0, 1, 2], np.float32), (r, k), p=[0.3, 0.2, 0.5])
  x = np.where(vis == 0, 0, x)
  y = np.where(vis == 0, 0, y)
  # A few unlabeled keypoints that would otherwise land inside: visibility alone must reject them.
  hidden = (vis > 0) & (rng.random((r, k)) < 0.05)
  vis = np.where(hidden, 0, vis)
  return np.stack([x, y, vis], axis=-1).astype(np.float32)


def _torch_targets(keypoints, rois):
  heatmaps, valid = tv_roi_heads.keypoints_to_heatmap(torch.tensor(keypoints), torch.tensor(rois), S)
  return heatmaps.numpy(), valid.numpy().astype(bool)


def test_keypoint_targets_match_torchvision():
  rng = np.random.default_rng(0)
  rois = _rois(rng, 400)
  kps = _keypoints(rng, rois)
  want_t, want_v = _torch_targets(kps, rois)
  got_t, got_v = jax.jit(losses.keypoint_targets, static_argnums=2)(kps, rois, S)
  got_t, got_v = np.asarray(got_t), np.asarray(got_v)
  assert got_t.dtype == np.int32 and got_v.dtype == bool
  assert got_t.shape == got_v.shape == (400, K)
  # The sample exercises every case: valid and not, the last row / column, outside by the edge ulp.
  assert 0.3 < want_v.mean() < 0.8
  assert np.any(want_v & (want_t % S == S - 1)) and np.any(want_v & (want_t // S == S - 1))
  assert np.any((kps[..., 2] > 0) & ~want_v)
  np.testing.assert_array_equal(got_v, want_v)
  np.testing.assert_array_equal(got_t, want_t)
  assert np.all((got_t >= 0) & (got_t < S * S))


def test_keypoint_targets_batched_and_degenerate_rois():
  """Leading batch dims broadcast; zero-size (padded) RoIs give torchvision's answer, indices stay in range."""
  rng = np.random.default_rng(1)
  rois = _rois(rng, 24).reshape(2, 12, 4)
  kps = _keypoints(rng, rois.reshape(24, 4)).reshape(2, 12, K, 3)
  got_t, got_v = losses.keypoint_targets(kps, rois, S)
  want_t, want_v = _torch_targets(kps.reshape(24, K, 3), rois.reshape(24, 4))
  np.testing.assert_array_equal(np.asarray(got_t).reshape(24, K), want_t)
  np.testing.assert_array_equal(np.asarray(got_v).reshape(24, K), want_v)

  # 0 / 0 and x / 0 scales. A labeled keypoint on the empty box's corner is "on the right edge", hence valid, in
  # torchvision too: callers AND in their RoIs' foreground mask.
  padded = np.zeros((3, 4), np.float32)
  kp = np.zeros((3, K, 3), np.float32)
  kp[0, :, 2] = 2  # labeled at (0, 0)
  kp[1, :, :2] = 5.0  # labeled, off the empty box: inf cell
  kp[1, :, 2] = 1
  kp[2, :, 0] = 0.0  # on the corner's x, y off: inf row
  kp[2, :, 1] = -3.0
  kp[2, :, 2] = 2
  got_t, got_v = jax.jit(losses.keypoint_targets, static_argnums=2)(kp, padded, S)
  want_t, want_v = _torch_targets(kp, padded)
  np.testing.assert_array_equal(np.asarray(got_v), want_v)
  np.testing.assert_array_equal(np.asarray(got_t), want_t)
  np.testing.assert_array_equal(np.asarray(got_v)[:, 0], [True, False, False])


def _case(rng, num_images=2, slots=8, num_fg=(6, 4), num_gt=(3, 5)):
  """Random logits and foreground RoIs of a batch, padded to `slots` RoIs per image (padding: zero boxes)."""
  logits = rng.normal(0, 3, (num_images, slots, S, S, K)).astype(np.float32)
  rois = np.zeros((num_images, slots, 4), np.float32)
  matched = np.zeros((num_images, slots), np.int32)
  fg = np.zeros((num_images, slots), bool)
  gt = []
  for i in range(num_images):
    g_rois = _rois(rng, num_gt[i])
    g_kps = _keypoints(rng, g_rois)
    n = num_fg[i]
    m = rng.integers(0, num_gt[i], n)
    # Proposals around the matched ground truth: the keypoints of a jittered box, some outside it.
    jitter = rng.normal(0, 6, (n, 4)).astype(np.float32)
    boxes = g_rois[m] + jitter
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    rois[i, :n], matched[i, :n], fg[i, :n] = boxes, m, True
    gt.append((g_kps, m))
  return logits, rois, matched, fg, gt


def _torch_loss(logits, rois, fg, gt):
  """torchvision's loss over the foreground RoIs only, and its gradient in our (B, F, S, S, K) layout."""
  nums = fg.sum(axis=1)
  chunks = [np.moveaxis(logits[i, :n], -1, 1) for i, n in enumerate(nums)]  # (n, K, S, S)
  t_logits = torch.tensor(np.ascontiguousarray(np.concatenate(chunks)), requires_grad=True)
  proposals = [torch.tensor(rois[i, :n]) for i, n in enumerate(nums)]
  gt_kps = [torch.tensor(k) for k, _ in gt]
  midx = [torch.tensor(m, dtype=torch.int64) for _, m in gt]
  loss = tv_roi_heads.keypointrcnn_loss(t_logits, proposals, gt_kps, midx)
  loss.backward()
  grad = np.zeros_like(logits)
  g = np.moveaxis(t_logits.grad.numpy(), 1, -1)
  start = 0
  for i, n in enumerate(nums):
    grad[i, :n] = g[start:start + n]
    start += n
  return float(loss.detach()), grad


def _our_loss(logits, rois, matched, fg, gt, normalizer="visible"):
  gt_kps = np.zeros((len(gt), 8, K, 3), np.float32)
  for i, (k, _) in enumerate(gt):
    gt_kps[i, :len(k)] = k

  def loss(lg):
    kps = jnp.take_along_axis(jnp.asarray(gt_kps), jnp.asarray(matched)[:, :, None, None], axis=1)
    targets, valid = losses.keypoint_targets(kps, rois, S)
    return losses.keypoint_loss(lg, targets, valid & fg[:, :, None], normalizer=normalizer)["loss_keypoint"]

  value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(logits))
  return float(value), np.asarray(grad)


def test_keypoint_loss_matches_torchvision():
  rng = np.random.default_rng(2)
  logits, rois, matched, fg, gt = _case(rng)
  want, want_grad = _torch_loss(logits, rois, fg, gt)
  got, got_grad = _our_loss(logits, rois, matched, fg, gt)
  assert want > 0
  assert got == pytest.approx(want, rel=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-8)
  # Padded RoI slots get no gradient.
  assert not np.any(got_grad[~fg])


def test_keypoint_loss_fixed_normalizer_matches_detectron2_formula():
  """Detectron2 with NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS=False: summed cross-entropy / (images * normalizer)."""
  rng = np.random.default_rng(3)
  logits, rois, matched, fg, gt = _case(rng)
  per_image = K * 512 * 0.25
  visible_mean, _ = _torch_loss(logits, rois, fg, gt)
  kps = np.concatenate([k[m] for k, m in gt])
  _, valid = _torch_targets(kps, np.concatenate([rois[i, :n] for i, n in enumerate(fg.sum(axis=1))]))
  want = visible_mean * valid.sum() / (2 * per_image)
  got, _ = _our_loss(logits, rois, matched, fg, gt, normalizer=per_image)
  assert got == pytest.approx(want, rel=1e-5)


def test_keypoint_loss_without_valid_keypoints_is_zero_with_finite_gradient():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 3, (2, 4, S, S, K)).astype(np.float32)
  targets = jnp.asarray(rng.integers(0, S * S, (2, 4, K)), jnp.int32)
  valid = jnp.zeros((2, 4, K), bool)
  for normalizer in ("visible", 100.0):
    def fn(lg, n=normalizer):
      return losses.keypoint_loss(lg, targets, valid, normalizer=n)["loss_keypoint"]

    value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(logits))
    assert float(value) == 0.0
    assert np.all(np.isfinite(np.asarray(grad)))
    assert not np.any(np.asarray(grad))

  # torchvision agrees: a batch whose keypoints are all unlabeled gives 0.
  kp = np.zeros((2, K, 3), np.float32)
  t_logits = torch.tensor(np.ascontiguousarray(np.moveaxis(logits[0, :2], -1, 1)))
  zero = tv_roi_heads.keypointrcnn_loss(t_logits, [torch.tensor([[0, 0, 10, 10], [5, 5, 20, 30]], dtype=torch.float32)],
                                        [torch.tensor(kp)], [torch.tensor([0, 1])])
  assert float(zero) == 0.0


def test_keypoint_loss_rejects_unknown_normalizer():
  with pytest.raises(ValueError, match="normalizer"):
    losses.keypoint_loss(jnp.zeros((1, 1, S, S, K)), jnp.zeros((1, 1, K), jnp.int32), jnp.ones((1, 1, K), bool),
                         normalizer="positive")
