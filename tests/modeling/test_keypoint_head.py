"""`heatmaps_to_keypoints` against torchvision's own (the resize and first argmax per RoI, with dynamic shapes) on
heatmaps that exercise the tile pruning: noise (almost every tile must be read), one sharp peak per map (one tile
suffices), all-zero maps (every pixel ties: the first in row-major order wins), and boxes from under one pixel to
larger than the 56 x 56 map, some touching the image's edge."""

import jax
import numpy as np
import pytest

from mrcnn_jax.modeling.keypoint_head import heatmaps_to_keypoints

torch = pytest.importorskip("torch", reason="torchvision is the oracle; install the `parity` extra")
roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")

IMAGE_HW = (300, 420)
S, K = 56, 3


def _boxes(rng, n):
  x0 = rng.uniform(0, IMAGE_HW[1] - 5, n)
  y0 = rng.uniform(0, IMAGE_HW[0] - 5, n)
  w = np.exp(rng.uniform(np.log(0.3), np.log(300), n))
  h = np.exp(rng.uniform(np.log(0.3), np.log(250), n))
  boxes = np.stack([x0, y0, np.minimum(x0 + w, IMAGE_HW[1]), np.minimum(y0 + h, IMAGE_HW[0])], axis=1)
  boxes[0] = [0, 0, IMAGE_HW[1], IMAGE_HW[0]]  # the whole image: every tile of the grid
  boxes[1] = [IMAGE_HW[1] - 0.2, 10, IMAGE_HW[1], 40]  # a sliver at the right edge
  return boxes.astype(np.float32)


def _maps(kind, rng, n):
  if kind == "noise":
    return rng.normal(size=(n, K, S, S)).astype(np.float32)
  if kind == "zeros":
    return np.zeros((n, K, S, S), np.float32)
  yy, xx = np.mgrid[0:S, 0:S]
  cy, cx = rng.uniform(0, S, (2, n, K, 1, 1))
  return (8.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 3.0) + 0.1 * rng.normal(size=(n, K, S, S))).astype(
      np.float32)


@pytest.mark.parametrize("kind", ["noise", "peaked", "zeros"])
def test_matches_torchvision(kind):
  rng = np.random.default_rng(0)
  n = 12
  maps, boxes = _maps(kind, rng, n), _boxes(rng, n)
  want_xy, want_score = roi_heads.heatmaps_to_keypoints(torch.tensor(maps), torch.tensor(boxes))
  got = jax.jit(heatmaps_to_keypoints, static_argnums=2)(
      np.moveaxis(maps, 1, -1)[None], boxes[None], IMAGE_HW)[0]
  got = np.asarray(got)
  np.testing.assert_allclose(got[..., :2], want_xy.numpy()[..., :2], atol=1e-3)
  np.testing.assert_allclose(got[..., 2], want_score.numpy(), rtol=1e-5, atol=1e-5)
