"""Tests of mrcnn_jax.ops.masks against torchvision (paste, RoIAlign) and a transcription of Detectron2's paster."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the oracle of the mask ops; install the `parity` extra")
torchvision = pytest.importorskip("torchvision", reason="torchvision is the oracle of the mask ops")
from detectron2_oracle import detectron2_paste_oracle  # noqa: E402  (tests/detectron2_oracle.py)
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes  # noqa: E402

from mrcnn_jax.ops.masks import crop_masks_to_boxes, mask_targets, paste_masks  # noqa: E402

IMAGE_HW = (37, 45)  # not square, so that x and y cannot be swapped unnoticed
MASK_SIZE = 28

# XYXY boxes in a 37 x 45 image: inside, partly outside on each side, sub-pixel and 1-pixel boxes, boxes whose
# integer (torchvision) or floor/ceil (Detectron2) rounding sits on an edge, and a box larger than the image.
# None lies wholly outside the image: torchvision's slicing goes wrong there (negative slice ends wrap around).
PASTE_BOXES = np.array(
    [
        [3.2, 4.7, 20.9, 30.1],
        [-6.5, 10.0, 12.3, 18.8],
        [30.0, -4.2, 51.7, 9.9],
        [10.4, 25.5, 27.0, 44.2],
        [17.3, 12.6, 17.6, 12.8],  # smaller than a pixel
        [5.0, 5.0, 6.0, 6.0],  # one pixel, on integers
        [22.5, 3.5, 24.5, 8.5],
        [-20.0, -15.0, 70.0, 60.0],  # larger than the image
        [0.0, 0.0, 45.0, 37.0],  # exactly the image
        [40.9, 30.1, 44.99, 36.99],
    ],
    np.float32,
)


def _random_masks(num, seed=0, size=MASK_SIZE):
  return np.random.default_rng(seed).uniform(size=(num, size, size)).astype(np.float32)


def _torchvision_paste(masks, boxes, image_hw):
  return paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), image_hw, padding=1)[
      :, 0
  ].numpy()


# --------------------------------------------------------------------------------------------------------------------
# paste_masks
# --------------------------------------------------------------------------------------------------------------------


# With 4 x 4 masks the boxes span many pixels per mask cell, so Detectron2's bilinear tails reach beyond its
# skip_empty region, where it leaves 0: this checks that region.
@pytest.mark.parametrize("mask_size", [MASK_SIZE, 4])
@pytest.mark.parametrize("mode", ["torchvision", "detectron2"])
def test_paste_masks_matches_reference(mode, mask_size):
  masks = _random_masks(len(PASTE_BOXES), size=mask_size)
  if mode == "torchvision":
    expected = _torchvision_paste(masks, PASTE_BOXES, IMAGE_HW)
    expected_bool = expected > 0.5
  else:
    expected = detectron2_paste_oracle(masks, PASTE_BOXES, IMAGE_HW)
    expected_bool = expected >= 0.5
  paste = jax.jit(paste_masks, static_argnums=(2, 3, 4))

  soft = np.asarray(paste(masks, PASTE_BOXES, IMAGE_HW, None, mode))
  assert soft.shape == (len(PASTE_BOXES),) + IMAGE_HW and soft.dtype == np.float32
  np.testing.assert_allclose(soft, expected, atol=1e-5, rtol=0)

  hard = np.asarray(paste(masks, PASTE_BOXES, IMAGE_HW, 0.5, mode))
  assert hard.dtype == np.bool_
  np.testing.assert_array_equal(hard, expected_bool)
  # Sanity of the inputs: the comparison covers pasted pixels, not just an empty image.
  assert expected_bool.sum() > 500


def test_paste_masks_binary_masks_thresholded_exactly():
  # Binary masks put many resampled values exactly on 0.5, where `>` and `>=` differ.
  masks = (_random_masks(len(PASTE_BOXES), seed=1) > 0.5).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(paste_masks(masks, PASTE_BOXES, IMAGE_HW, 0.5, "torchvision")),
      _torchvision_paste(masks, PASTE_BOXES, IMAGE_HW) > 0.5,
  )
  np.testing.assert_array_equal(
      np.asarray(paste_masks(masks, PASTE_BOXES, IMAGE_HW, 0.5, "detectron2")),
      detectron2_paste_oracle(masks, PASTE_BOXES, IMAGE_HW) >= 0.5,
  )


def test_paste_masks_hand_case():
  # A 2 x 2 mask of ones into the box [2, 2, 6, 6] of a 10 x 10 image.
  masks = np.ones((1, 2, 2), np.float32)
  boxes = np.array([[2.0, 2.0, 6.0, 6.0]], np.float32)

  # Detectron2: pixel y samples mask row (y - 2.5) / 2, so rows 2..5 read >= 0.75 of a one (0.75 at the border
  # pixels) and rows 1 and 6 read 0.25. The binary mask is exactly the box's 4 x 4 pixels.
  soft = np.asarray(paste_masks(masks, boxes, (10, 10), None, "detectron2"))[0]
  axis = np.array([0, 0.25, 0.75, 1, 1, 0.75, 0.25, 0, 0, 0], np.float32)
  np.testing.assert_allclose(soft, axis[:, None] * axis[None, :], atol=1e-6)
  expected = np.zeros((10, 10), bool)
  expected[2:6, 2:6] = True
  np.testing.assert_array_equal(np.asarray(paste_masks(masks, boxes, (10, 10), 0.5, "detectron2"))[0], expected)

  # torchvision: the zero-padded 4 x 4 mask is resized onto the grown integer box [0, 8] (9 pixels, inclusive),
  # giving per axis [0, 1/6, 11/18, 1, 1, 1, 11/18, 1/6, 0, 0]; the corners (11/18)^2 < 0.5 drop out, so the binary
  # mask is the 5 x 5 square at rows/cols 2..6 without its four corners.
  soft = np.asarray(paste_masks(masks, boxes, (10, 10), None, "torchvision"))[0]
  axis = np.array([0, 1 / 6, 11 / 18, 1, 1, 1, 11 / 18, 1 / 6, 0, 0], np.float32)
  np.testing.assert_allclose(soft, axis[:, None] * axis[None, :], atol=1e-6)
  expected = np.zeros((10, 10), bool)
  expected[2:7, 2:7] = True
  expected[[2, 2, 6, 6], [2, 6, 2, 6]] = False
  np.testing.assert_array_equal(np.asarray(paste_masks(masks, boxes, (10, 10), 0.5, "torchvision"))[0], expected)


def test_paste_masks_degenerate_and_outside_boxes_paste_nothing():
  masks = np.ones((4, 28, 28), np.float32)
  boxes = np.array(
      [
          [5.0, 7.0, 20.0, 7.0],  # zero height
          [9.0, 3.0, 9.0, 30.0],  # zero width
          [60.0, 50.0, 80.0, 70.0],  # beyond the bottom-right corner
          [-40.0, -30.0, -10.0, -5.0],  # beyond the top-left corner
      ],
      np.float32,
  )
  soft = np.asarray(paste_masks(masks, boxes, IMAGE_HW, None, "detectron2"))
  assert np.isfinite(soft).all() and not soft.any()
  # torchvision's own paster cannot take boxes wholly outside the image (its slices wrap), so only ours is checked.
  assert not np.asarray(paste_masks(masks[2:], boxes[2:], IMAGE_HW, None, "torchvision")).any()


def test_paste_masks_no_instances():
  out = paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (8, 9))
  assert out.shape == (0, 8, 9) and out.dtype == np.bool_


def test_paste_masks_rejects_unknown_mode():
  with pytest.raises(ValueError, match="mode"):
    paste_masks(np.zeros((1, 28, 28), np.float32), np.zeros((1, 4), np.float32), (8, 9), 0.5, "maskformer")


# --------------------------------------------------------------------------------------------------------------------
# crop_masks_to_boxes
# --------------------------------------------------------------------------------------------------------------------


def _blob_masks(num, height, width, seed=0):
  """Random binary masks: a union of a few random ellipses each, so crops hold edges and solid areas."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:height, :width]
  masks = np.zeros((num, height, width), bool)
  for i in range(num):
    for _ in range(3):
      cy, cx = rng.uniform(0, height), rng.uniform(0, width)
      ry, rx = rng.uniform(3, height / 2), rng.uniform(3, width / 2)
      masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  return masks


def _roi_align_oracle(masks, boxes, size):
  """torchvision RoIAlign (aligned, adaptive sampling) of each full mask over its box, times 255, rounded."""
  out = []
  for mask, box in zip(masks, boxes):
    crop = torchvision.ops.roi_align(
        torch.from_numpy(mask)[None, None].float(),
        [torch.from_numpy(box[None]).float()],
        (size, size),
        spatial_scale=1.0,
        sampling_ratio=0,
        aligned=True,
    )[0, 0]
    out.append(torch.round(crop * 255).numpy())
  return np.stack(out)


@pytest.mark.parametrize("size", [28, 112])
def test_crop_masks_matches_roi_align(size):
  height, width = 150, 130
  boxes = np.array(
      [
          [10.3, 20.7, 60.2, 90.4],  # inside
          [-12.0, 30.5, 40.0, 70.0],  # partly left of the image
          [100.0, -8.3, 140.6, 40.0],  # partly above and right of it
          [20.0, 120.2, 70.9, 163.0],  # partly below it
          [-30.0, -25.0, 170.0, 190.0],  # larger than the image: several samples per bin
          [0.0, 0.0, 130.0, 150.0],  # exactly the image
          [50.2, 60.7, 51.1, 61.0],  # smaller than a pixel
          [64.5, 10.0, 66.5, 140.0],  # thin and tall
          [-0.7, 149.2, 5.0, 150.9],  # at the bottom-left corner, in RoIAlign's clamped border
      ],
      np.float32,
  )
  masks = _blob_masks(len(boxes), height, width)
  # Uint8 masks too (e.g. decoded RLE), for half of the instances.
  inputs = [m.astype(np.uint8) if i % 2 else m for i, m in enumerate(masks)]
  crops = crop_masks_to_boxes(np.stack([np.asarray(m, np.uint8) for m in inputs]), boxes, size)
  assert crops.shape == (len(boxes), size, size) and crops.dtype == np.uint8
  expected = _roi_align_oracle(masks, boxes, size)
  assert np.abs(crops.astype(np.int32) - expected).max() <= 1
  assert (crops > 0).sum() > 1000

  np.testing.assert_array_equal(crop_masks_to_boxes(masks, boxes, size), crops)  # bool input, same result


def test_crop_masks_default_size_and_degenerate_boxes():
  masks = np.ones((4, 20, 30), bool)
  boxes = np.array(
      [
          [5.0, 5.0, 5.0, 15.0],  # zero width
          [3.0, 9.0, 20.0, 2.0],  # negative height
          [50.0, 40.0, 60.0, 48.0],  # wholly outside the image
          [2.0, 3.0, 12.0, 17.0],  # a real box over an all-ones mask
      ],
      np.float32,
  )
  crops = crop_masks_to_boxes(masks, boxes)
  assert crops.shape == (4, 112, 112) and crops.dtype == np.uint8
  assert not crops[:3].any()
  assert (crops[3] == 255).all()


def test_crop_masks_no_instances():
  crops = crop_masks_to_boxes(np.zeros((0, 20, 30), bool), np.zeros((0, 4), np.float32), 28)
  assert crops.shape == (0, 28, 28) and crops.dtype == np.uint8


# --------------------------------------------------------------------------------------------------------------------
# mask_targets: RoIAlign of the matched GT crop.
# --------------------------------------------------------------------------------------------------------------------


def test_mask_targets_hand_case():
  # A GT mask filling its box [10, 10, 20, 20]; a RoI twice as wide to the right: the left half of the target reads
  # the mask (1), the right half lies outside the GT box and reads 0 (not the clamped border value).
  crops = np.full((1, 112, 112), 255, np.uint8)
  got = mask_targets(jnp.asarray(crops), jnp.array([[10.0, 10, 20, 20]]), jnp.array([[10.0, 10, 30, 20]]),
                     jnp.array([0]), 4, sampling_ratio=2)
  np.testing.assert_allclose(np.asarray(got)[0], np.tile([1.0, 1.0, 0.0, 0.0], (4, 1)), atol=1e-6)


def _ellipse_masks(rng, num, hw):
  # Filled ellipses: smooth shapes, as real instance masks are.
  yy, xx = np.mgrid[: hw[0], : hw[1]]
  masks, boxes = [], []
  for _ in range(num):
    cy, cx = rng.uniform(10, hw[0] - 10), rng.uniform(10, hw[1] - 10)
    ry, rx = rng.uniform(4, 30), rng.uniform(4, 30)
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    ys, xs = np.nonzero(m)
    masks.append(m)
    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
  return np.stack(masks).astype(np.uint8), np.array(boxes, np.float32)


@pytest.mark.parametrize("aligned", [True, False])
def test_mask_targets_match_roi_align_of_the_full_mask(aligned):
  rng = np.random.default_rng(5)
  masks, gt_boxes = _ellipse_masks(rng, 6, (90, 120))
  crops = crop_masks_to_boxes(masks, gt_boxes)
  # RoIs: jittered GT boxes (what foreground proposals look like), each matched to its GT.
  matched = rng.integers(0, 6, 40)
  g = gt_boxes[matched]
  wh = (g[:, 2:] - g[:, :2])
  jitter = rng.uniform(-0.25, 0.25, (40, 4)) * np.concatenate([wh, wh], 1)
  rois = (g + jitter).astype(np.float32)
  got = np.asarray(mask_targets(jnp.asarray(crops), jnp.asarray(gt_boxes), jnp.asarray(rois), jnp.asarray(matched),
                                28, aligned=aligned))
  if aligned:  # Detectron2: RoIAlign(aligned=True, adaptive) of the full-image mask.
    want = torchvision.ops.roi_align(torch.tensor(masks[matched, None], dtype=torch.float32),
                                     list(torch.tensor(rois)[:, None]), 28, 1.0, 0, True)[:, 0].numpy()
  else:  # torchvision's own target function.
    want = project_masks_on_boxes(torch.tensor(masks), torch.tensor(rois), torch.tensor(matched), 28).numpy()
  # The crop is a 112x112 resampling stored in uint8, so targets agree up to resampling at the mask's edges. Where a
  # RoI reaches past the image border, the full-image op clamps to the border pixel while the crop reads 0 outside
  # the GT box; compare inside the image only.
  ys = rois[:, 1, None] + (np.arange(28) + 0.5) * (rois[:, 3, None] - rois[:, 1, None]) / 28
  xs = rois[:, 0, None] + (np.arange(28) + 0.5) * (rois[:, 2, None] - rois[:, 0, None]) / 28
  inside = ((ys >= 0) & (ys <= 89))[:, :, None] & ((xs >= 0) & (xs <= 119))[:, None, :]
  diff = np.abs(got - want)[inside]
  assert diff.mean() < 0.01
  assert np.quantile(diff, 0.95) < 0.05  # the rest sits on hard mask edges, where resampling differs most
  agree = ((got >= 0.5) == (want >= 0.5))[inside].mean()
  assert agree > 0.99


def test_mask_targets_degenerate_gt_and_batching():
  crops = jnp.full((2, 2, 112, 112), 255, jnp.uint8)
  gt = jnp.array([[[0.0, 0, 10, 10], [5.0, 5, 5, 20]]] * 2)  # the second GT box has zero width
  rois = jnp.array([[[0.0, 0, 10, 10], [5.0, 5, 6, 20]]] * 2)
  matched = jnp.array([[0, 1]] * 2)
  got = np.asarray(mask_targets(crops, gt, rois, matched, 7))
  assert got.shape == (2, 2, 7, 7) and np.all(np.isfinite(got))
  np.testing.assert_allclose(got[:, 0], 1.0, atol=1e-6)
  np.testing.assert_array_equal(got[:, 1], 0.0)
