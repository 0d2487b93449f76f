"""The Predictor's host-side logic and `to_coco_results`.

The model is replaced by `fixed_detections_infer`, a test double that returns the same known detections in canvas
pixels for every image: these tests check what the Predictor does around the model (preprocessing, batching,
mapping back to original pixels, mask pasting, COCO output), not the model.
"""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mrcnn_jax.data import transforms
from mrcnn_jax.predictor import Predictor, to_coco_results

CANVAS_HW = (96, 96)
MASK = 28
# Detections in canvas (resized-image) pixels, XYXY; D = 5 slots.
CANVAS_BOXES = np.array([
    [20, 10, 60, 50],   # inside the image
    [4, 6, 30, 62],     # inside the image
    [0, 0, 90, 64],     # an invalid slot
    [10, 10, 95, 70],   # crosses the right and bottom edges of the resized image: clipped
    [0, 70, 10, 90],    # below every resized image here (all are <= 64 px tall): empty after clipping, dropped
], np.float32)
VALID = np.array([True, True, False, True, True])
D = len(CANVAS_BOXES)
KEYPOINT_XY = np.array([40.0, 20.0], np.float32)


def _masks():
  """(D, 28, 28): slot 1 covers the top half of its box (rows 0..13), every other slot its whole box."""
  masks = np.ones((D, MASK, MASK), np.float32)
  masks[1, MASK // 2:] = 0.0
  return masks


def make_fixed_detections_infer(traces):
  """The test double for `build_infer(config)`: fixed detections in canvas pixels, the same for every image.

  Each image's scores are its original width plus the slot index (read from image_info), so tests can tell which
  result came from which image; classes come from `variables`, so tests see the variables arrive. Appends to
  `traces` each time JAX traces it.
  """

  def fixed_detections_infer(variables, images, image_info):
    traces.append(images.shape)
    batch = images.shape[0]
    scores = image_info[:, transforms.INFO_ORIG_W, None] + jnp.arange(D, dtype=jnp.float32)
    keypoints = jnp.concatenate(
        [jnp.broadcast_to(jnp.asarray(KEYPOINT_XY), (batch, D, 17, 2)),
         jnp.broadcast_to(jnp.arange(17, dtype=jnp.float32)[:, None], (batch, D, 17, 1))], axis=-1)
    return {
        "boxes": jnp.broadcast_to(jnp.asarray(CANVAS_BOXES), (batch, D, 4)),
        "scores": scores,
        "classes": jnp.broadcast_to(variables["classes"], (batch, D)),
        "valid": jnp.broadcast_to(jnp.asarray(VALID), (batch, D)),
        "masks": jnp.broadcast_to(jnp.asarray(_masks()), (batch, D, MASK, MASK)),
        "keypoints": keypoints,
    }

  return fixed_detections_infer


VARIABLES = {"classes": np.array([1, 2, 3, 4, 5], np.int32)}


def make_config(resize_mode="torchvision", paste_mode="detectron2", keypoints=False, canvases=(CANVAS_HW,)):
  config = ml_collections.ConfigDict()
  config.input = ml_collections.ConfigDict(dict(
      pixel_format="RGB", pixel_scale=1.0, pixel_mean=[0.485, 0.456, 0.406], pixel_std=[0.229, 0.224, 0.225],
      resize_mode=resize_mode, min_size_test=64, max_size_test=96, canvases=canvases))
  config.model = ml_collections.ConfigDict(dict(
      mask_head=dict(enabled=True, paste_mode=paste_mode, mask_threshold=0.5),
      keypoint_head=dict(enabled=keypoints), label_space="contiguous"))
  return config


def make_predictor(traces=None, batch_size=1, **config_kwargs):
  traces = [] if traces is None else traces
  return Predictor(make_config(**config_kwargs), VARIABLES, infer_fn=make_fixed_detections_infer(traces),
                   batch_size=batch_size)


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Mapping back to the original image.
# --------------------------------------------------------------------------------------------------------------------


# A 30x43 image: torchvision resizes it to 64 x int(43 * 64 / 30) = 64 x 91, Detectron2 to 64 x round(91.73) = 64 x 92.
@pytest.mark.parametrize("resize_mode, resized_hw", [("torchvision", (64, 91)), ("detectron2", (64, 92))])
def test_boxes_map_back_to_original_pixels(resize_mode, resized_hw):
  assert transforms.output_size(30, 43, 64, 96, resize_mode) == resized_hw
  (result,) = make_predictor(resize_mode=resize_mode)([_image(30, 43)])

  # Slots 0, 1, 3 survive (2 is invalid, 4 is empty after clipping); x scales by 43 / resized_w, y by 30 / 64.
  sx, sy = 43 / resized_hw[1], 30 / resized_hw[0]
  expected = CANVAS_BOXES[[0, 1, 3]].astype(np.float64) * [sx, sy, sx, sy]
  expected = np.minimum(expected, [43, 30, 43, 30])
  assert result["boxes"].dtype == np.float32
  np.testing.assert_allclose(result["boxes"], expected, rtol=1e-6)
  np.testing.assert_array_equal(result["boxes"][2, 2:], [43, 30])  # the clipped one
  np.testing.assert_array_equal(result["labels"], [1, 2, 4])
  np.testing.assert_array_equal(result["scores"], [43, 44, 46])

  if resize_mode == "torchvision":
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.transform import resize_boxes

    oracle = resize_boxes(torch.from_numpy(CANVAS_BOXES[[0, 1]]), resized_hw, (30, 43)).numpy()
    np.testing.assert_array_equal(result["boxes"][:2], oracle)


def test_keypoints_map_back_to_original_pixels():
  (result,) = make_predictor(keypoints=True)([_image(30, 43)])
  keypoints = result["keypoints"]
  assert keypoints.shape == (3, 17, 3) and keypoints.dtype == np.float32
  np.testing.assert_allclose(keypoints[..., 0], 40.0 * 43 / 91, rtol=1e-6)
  np.testing.assert_allclose(keypoints[..., 1], 20.0 * 30 / 64, rtol=1e-6)
  np.testing.assert_array_equal(keypoints[0, :, 2], np.arange(17))  # scores untouched


@pytest.mark.parametrize("resize_mode", ["torchvision", "detectron2"])
def test_masks_pasted_at_their_boxes_in_the_original_image(resize_mode):
  # 32x48 resizes by exactly 2 to 64x96 in both modes, so the original boxes are integers:
  # slot 0 -> [10, 5, 30, 25], slot 1 -> [2, 3, 15, 31].
  (result,) = make_predictor(resize_mode=resize_mode)([_image(32, 48)])
  np.testing.assert_array_equal(result["boxes"][:2], [[10, 5, 30, 25], [2, 3, 15, 31]])
  masks = result["masks"]
  assert masks.shape == (3, 32, 48) and masks.dtype == bool

  # A full 28x28 mask covers exactly its box's pixels.
  expected = np.zeros((32, 48), bool)
  expected[5:25, 10:30] = True
  np.testing.assert_array_equal(masks[0], expected)
  # Rows 0..13 of slot 1's mask: the box is 28 px tall, one mask row per pixel row, so rows 3..16 of the image.
  expected = np.zeros((32, 48), bool)
  expected[3:17, 2:15] = True
  np.testing.assert_array_equal(masks[1], expected)


def test_torchvision_paste_mode_matches_torchvision():
  torch = pytest.importorskip("torch")
  from torchvision.models.detection.roi_heads import paste_masks_in_image

  (result,) = make_predictor(paste_mode="torchvision")([_image(30, 43)])
  oracle = paste_masks_in_image(torch.from_numpy(_masks()[[0, 1, 3], None]), torch.from_numpy(result["boxes"]),
                                (30, 43), padding=1)[:, 0].numpy() > 0.5
  np.testing.assert_array_equal(result["masks"], oracle)


# --------------------------------------------------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------------------------------------------------


def test_ragged_last_batch_keeps_order_and_compiles_once():
  traces = []
  predictor = make_predictor(traces, batch_size=2)
  widths = [40, 45, 41, 47, 44]
  images = [_image(30, w, seed=w) for w in widths]
  images[3] = images[3].astype(np.float32) / 255.0  # uint8 and float images mix
  results = predictor(images)

  assert len(results) == 5
  for result, width in zip(results, widths):
    np.testing.assert_array_equal(result["scores"], [width, width + 1, width + 3])
    assert result["masks"].shape == (3, 30, width)
  assert traces == [(2, 96, 96, 3)]  # three batches, one trace

  # The same images one at a time give the same results.
  single = make_predictor(batch_size=1)(images)
  for a, b in zip(results, single):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_empty_list_and_no_detections():
  assert make_predictor()([]) == []

  def nothing_valid_infer(variables, images, image_info):
    out = make_fixed_detections_infer([])(variables, images, image_info)
    return dict(out, valid=jnp.zeros_like(out["valid"]))

  (result,) = Predictor(make_config(), VARIABLES, infer_fn=nothing_valid_infer)([_image(30, 43)])
  assert result["boxes"].shape == (0, 4) and result["scores"].shape == (0,) and result["labels"].shape == (0,)
  assert result["masks"].shape == (0, 30, 43)
  assert to_coco_results([result], [1]) == []


# --------------------------------------------------------------------------------------------------------------------
# Input validation.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros((30, 40), np.uint8), ValueError, r"image 1 must be an \(H, W, 3\)"),
    (np.zeros((30, 40, 4), np.uint8), ValueError, r"image 1 .*got shape \(30, 40, 4\)"),
    (np.zeros((30, 40, 3), np.int64), TypeError, "image 1 has dtype int64"),
    (np.full((30, 40, 3), np.nan, np.float32), ValueError, "image 1 has non-finite"),
    (np.full((30, 40, 3), 200.0, np.float32), ValueError, r"image 1 is float .*outside \[0, 1\]"),
])
def test_bad_images_are_rejected_naming_the_index(bad, error, message):
  traces = []
  predictor = make_predictor(traces, batch_size=2)
  with pytest.raises(error, match=message):
    predictor([_image(30, 40), bad, _image(30, 40)])
  assert traces == []  # checked before anything ran


def test_images_must_be_a_list():
  with pytest.raises(TypeError, match="list"):
    make_predictor()(_image(30, 40))


def test_image_that_does_not_fit_the_canvas_names_the_index():
  traces = []
  predictor = make_predictor(traces, canvases=((64, 96),))
  with pytest.raises(ValueError, match=r"image 1 \(43x30\): an image resized to 91x64 .*fits none of the canvases 64x96"):
    predictor([_image(32, 48), _image(43, 30)])
  assert traces == []  # checked before the first image ran


def test_images_are_batched_by_canvas_and_returned_in_order():
  """Landscape and portrait images go to their own canvas (one program each, traced once), batched with images of
  the same canvas, and the results come back in the order given."""
  traces = []
  predictor = make_predictor(traces, batch_size=2, canvases=((64, 96), (96, 64)))
  images = [_image(32, 48, 0), _image(48, 32, 1), _image(32, 48, 2), _image(48, 32, 3), _image(32, 48, 4)]
  results = predictor(images)
  assert sorted(traces) == [(2, 64, 96, 3), (2, 96, 64, 3)]
  alone = make_predictor(batch_size=1, canvases=((64, 96), (96, 64)))
  for image, got in zip(images, results):
    want = alone([image])[0]
    np.testing.assert_array_equal(got["boxes"], want["boxes"])
    assert got["masks"].shape[1:] == image.shape[:2]


def test_bad_config_and_batch_size():
  with pytest.raises(ValueError, match="paste_mode"):
    make_predictor(paste_mode="bicubic")
  with pytest.raises(ValueError, match="resize_mode"):
    make_predictor(resize_mode="opencv")
  with pytest.raises(ValueError, match="batch_size"):
    make_predictor(batch_size=0)


# --------------------------------------------------------------------------------------------------------------------
# COCO results.
# --------------------------------------------------------------------------------------------------------------------


def _write_ground_truth(path, image_id, height, width):
  gt = {
      "images": [{"id": image_id, "height": height, "width": width, "file_name": "a.png"}],
      "categories": [{"id": i, "name": f"c{i}", "keypoints": [f"k{j}" for j in range(17)], "skeleton": []}
                     for i in (1, 3, 5, 7, 9)],
      "annotations": [{"id": 1, "image_id": image_id, "category_id": 3, "bbox": [10, 5, 20, 20], "area": 400.0,
                       "iscrowd": 0, "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]],
                       "keypoints": [20, 10, 2] * 17, "num_keypoints": 17}],
  }
  path.write_text(json.dumps(gt))


def test_coco_results_round_trip_through_pycocotools(tmp_path):
  from pycocotools.coco import COCO
  from pycocotools import mask as mask_util

  (pred,) = make_predictor(keypoints=True)([_image(32, 48)])
  category_ids = [0, 1, 3, 5, 7, 9]  # label -> COCO category id; 0 is the background
  results = to_coco_results([pred], [42], category_ids=category_ids)
  assert len(results) == 3

  gt_path, res_path = tmp_path / "gt.json", tmp_path / "results.json"
  _write_ground_truth(gt_path, 42, 32, 48)
  res_path.write_text(json.dumps(results))  # json-serializable as it is
  coco = COCO(str(gt_path))
  loaded = coco.loadRes(str(res_path))
  anns = [loaded.anns[i] for i in sorted(loaded.anns)]

  for k, ann in enumerate(anns):
    assert ann["image_id"] == 42
    assert ann["category_id"] == category_ids[pred["labels"][k]]
    x1, y1, x2, y2 = pred["boxes"][k]
    np.testing.assert_allclose(ann["bbox"], [x1, y1, x2 - x1, y2 - y1], rtol=1e-6)
    assert ann["score"] == pytest.approx(float(pred["scores"][k]))
    np.testing.assert_array_equal(loaded.annToMask(ann).astype(bool), pred["masks"][k])
    np.testing.assert_array_equal(mask_util.decode(ann["segmentation"]).astype(bool), pred["masks"][k])
    keypoints = np.array(ann["keypoints"]).reshape(17, 3)
    # Detectron2's convention: x and y shifted back by half a pixel, the keypoint score third.
    np.testing.assert_allclose(keypoints[:, :2], pred["keypoints"][k, :, :2] - 0.5, rtol=1e-6)
    np.testing.assert_array_equal(keypoints[:, 2], pred["keypoints"][k, :, 2])

  # The first detection is the GT box exactly (canvas [20, 10, 60, 50] at scale 2).
  assert anns[0]["bbox"] == [10.0, 5.0, 20.0, 20.0]


def test_coco_results_without_category_map_keep_labels_and_offset_is_optional():
  pred = {"boxes": np.array([[1, 2, 4, 8]], np.float32), "scores": np.array([0.5], np.float32),
          "labels": np.array([18], np.int32), "keypoints": np.full((1, 17, 3), 3.0, np.float32)}
  (result,) = to_coco_results([pred], [np.int64(7)], keypoint_offset=0.0)
  assert result == {"image_id": 7, "category_id": 18, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.5,
                    "keypoints": [3.0] * 51}
  assert type(result["image_id"]) is int
  json.dumps(result)


def test_coco_results_errors():
  pred = {"boxes": np.zeros((1, 4), np.float32), "scores": np.ones(1, np.float32), "labels": np.array([3])}
  with pytest.raises(ValueError, match="1 predictions and 2 image ids"):
    to_coco_results([pred], [1, 2])
  with pytest.raises(ValueError, match="label 3 of image 9"):
    to_coco_results([pred], [9], category_ids=[0, 1, 2])


# --------------------------------------------------------------------------------------------------------------------
# From a checkpoint.
# --------------------------------------------------------------------------------------------------------------------


def test_from_checkpoint_runs_with_the_saved_config_or_a_matching_one(tmp_path, load_config):
  """The config saved with the checkpoint (class names included), or a given one checked against it; the variables
  are the checkpoint's. Nothing runs here: the Predictor only builds its jitted program."""
  from mrcnn_jax import checkpoint

  config = load_config("shapes")
  config.model.class_names = ("disc", "ring", "blob")
  variables = {"params": {"w": np.arange(3, dtype=np.float32)}, "batch_stats": {}}
  path = checkpoint.save_variables(tmp_path / "ckpt", variables, config=config)

  predictor = Predictor.from_checkpoint(path, batch_size=2)
  assert predictor.batch_size == 2 and predictor.config.to_dict() == config.to_dict()
  np.testing.assert_array_equal(predictor.variables["params"]["w"], variables["params"]["w"])
  given = load_config("shapes")
  given.model.roi_heads.score_thresh_test = 0.3  # a model field other than the checkpoint's
  with pytest.raises(ValueError, match=r"model.roi_heads.score_thresh_test: 0.05 in the checkpoint, 0.3 in the "
                                       r"given config"):
    Predictor.from_checkpoint(path, config=given)
  same = load_config("shapes")
  assert Predictor.from_checkpoint(path, config=same).config.model.class_names == ("disc", "ring", "blob")
  assert same.model.class_names == ("circle", "square", "triangle")  # the given config is copied, not changed
