"""COCO evaluation: scores against pycocotools' COCOeval run directly (or hand-computed values), the image-set check,
the files written, the command line, and `checkpoint.load_inference` on each kind of checkpoint directory.

Scoring tests build COCO results from a small hand-made ground truth; evaluation runs through the data pipeline and
the Predictor use a test double for the model (fixed detections) except the end-to-end ones, which run a tiny
random-init Mask R-CNN on a tiny shapes set.
"""

import copy
import json
import math
import pathlib
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_jax import checkpoint, coco_eval, evaluate, train_checkpoint
from mrcnn_jax.data import coco, shapes
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.train_state import TrainState

import tiny_model
from conftest import command_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "mask_rcnn_R50_FPN_1x.py"
# COCOeval.stats in summarize()'s order.
BOX_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR", "ARs", "ARm", "ARl")
KEYPOINT_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


# --------------------------------------------------------------------------------------------------------------------
# A hand-made ground truth: three categories with id gaps, small / medium / large objects, a crowd region, and an
# image without objects.
# --------------------------------------------------------------------------------------------------------------------

SIZE = 200
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]


def _ellipse(box, shift=(0, 0), hw=(SIZE, SIZE)):
  """(H, W) bool: the ellipse inscribed in box (x0, y0, x1, y1), moved by shift (dx, dy) pixels."""
  yy, xx = np.mgrid[:hw[0], :hw[1]] + 0.5
  x0, y0, x1, y1 = box
  cx, cy = (x0 + x1) / 2 + shift[0], (y0 + y1) / 2 + shift[1]
  return ((xx - cx) / ((x1 - x0) / 2)) ** 2 + ((yy - cy) / ((y1 - y0) / 2)) ** 2 <= 1


def _rle(mask):
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def _annotation(ann_id, image_id, category_id, mask, iscrowd=0):
  rle = _rle(mask)
  return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": rle,
          "bbox": mask_util.toBbox(rle).tolist(), "area": float(mask_util.area(rle)), "iscrowd": iscrowd}


# (image id, category id, box, iscrowd): ellipse areas ~280 (small), ~2800 (medium), ~9700 (large) pixels.
OBJECTS = [
    (10, 1, (10, 10, 30, 28), 0),
    (10, 3, (50, 40, 110, 100), 0),
    (10, 1, (60, 100, 190, 195), 0),
    (11, 3, (150, 10, 175, 35), 0),
    (11, 7, (20, 60, 90, 120), 0),
    (11, 1, (100, 120, 190, 190), 1),
]
IMAGE_IDS = (10, 11, 12)  # 12 has no objects


def _write(path, dataset):
  path.write_text(json.dumps(dataset))
  return path


@pytest.fixture(scope="module")
def boxes_gt(tmp_path_factory):
  """Path of the hand-made ground truth JSON."""
  images = [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in IMAGE_IDS]
  annotations = [_annotation(n + 1, image_id, cat, _ellipse(box), crowd)
                 for n, (image_id, cat, box, crowd) in enumerate(OBJECTS)]
  return _write(tmp_path_factory.mktemp("gt") / "instances.json",
                {"images": images, "annotations": annotations, "categories": CATEGORIES})


def _result(image_id, category_id, mask, score):
  rle = _rle(mask)
  return {"image_id": image_id, "category_id": category_id, "bbox": mask_util.toBbox(rle).tolist(),
          "segmentation": rle, "score": score}


def _perfect_results():
  return [_result(image_id, cat, _ellipse(box), 1.0) for image_id, cat, box, crowd in OBJECTS if not crowd]


def _results_with_errors():
  o = OBJECTS
  return [
      _result(10, 1, _ellipse(o[0][2]), 0.9),                 # exact
      _result(10, 3, _ellipse(o[1][2], shift=(10, 0)), 0.8),  # shifted by 10 px: IoU ~0.7
      _result(10, 7, _ellipse(o[2][2]), 0.95),                # the right place, the wrong class
      # image 11: the small dog is missed
      _result(11, 7, _ellipse(o[4][2]), 0.6),                 # exact
      _result(11, 7, _ellipse(o[4][2], shift=(3, 4)), 0.3),   # a near duplicate: a false positive at most IoUs
      _result(11, 1, _ellipse(o[5][2]), 0.7),                 # on the crowd region: ignored
      _result(12, 3, _ellipse((40, 40, 100, 90)), 0.99),      # a false positive on the empty image
  ]


def _cocoeval_stats(gt_path, results, iou_type, cat_ids=None):
  """pycocotools run directly, with its standard parameters and summarize(): stats * 100, -1 as NaN."""
  gt = COCO(str(gt_path))
  dt = gt.loadRes(copy.deepcopy(list(results)))
  cocoeval = COCOeval(gt, dt, iou_type)
  if cat_ids is not None:
    cocoeval.params.catIds = cat_ids
  cocoeval.evaluate()
  cocoeval.accumulate()
  cocoeval.summarize()
  return [math.nan if s == -1 else float(s * 100) for s in cocoeval.stats]


def _same(a, b):
  return (math.isnan(a) and math.isnan(b)) or a == b


def _without_bbox(results):
  # Detectron2's rule for segm: the area (APs/m/l) of a detection is its mask's, so the box is left out.
  return [{k: v for k, v in r.items() if k != "bbox"} for r in results]


# --------------------------------------------------------------------------------------------------------------------
# Scoring.
# --------------------------------------------------------------------------------------------------------------------


def test_perfect_predictions_score_100(boxes_gt):
  metrics = coco_eval.score_coco(COCO(str(boxes_gt)), _perfect_results(), IMAGE_IDS, iou_types=("bbox", "segm"))
  for task in ("bbox", "segm"):
    for name in BOX_STATS:
      if name == "AR@1":  # image 10 holds two cats: one detection per image finds one of them
        assert metrics[f"{task}/{name}"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
      else:
        assert metrics[f"{task}/{name}"] == pytest.approx(100.0), f"{task}/{name}"
    for category in ("cat", "dog", "bird"):
      assert metrics[f"{task}/AP-{category}"] == pytest.approx(100.0)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_known_errors_score_what_cocoeval_scores(boxes_gt, iou_type):
  results = _results_with_errors()
  metrics = coco_eval.score_coco(COCO(str(boxes_gt)), results, IMAGE_IDS, iou_types=("bbox", "segm"),
                                 max_detections=100)
  direct = results if iou_type == "bbox" else _without_bbox(results)
  expected = _cocoeval_stats(boxes_gt, direct, iou_type)
  for name, value in zip(BOX_STATS, expected):
    assert _same(metrics[f"{iou_type}/{name}"], value), (name, metrics[f"{iou_type}/{name}"], value)
  assert 0 < metrics[f"{iou_type}/AP"] < 100
  for category in CATEGORIES:
    expected_ap = _cocoeval_stats(boxes_gt, direct, iou_type, cat_ids=[category["id"]])[0]
    assert _same(metrics[f"{iou_type}/AP-{category['name']}"], expected_ap), category


def test_results_are_not_modified(boxes_gt):
  results = _results_with_errors()
  before = copy.deepcopy(results)
  coco_eval.score_coco(COCO(str(boxes_gt)), results, IMAGE_IDS, iou_types=("bbox", "segm"))
  assert results == before


def test_every_image_of_the_set_is_scored(boxes_gt):
  """A false positive on the image without objects lowers AP only if that image is scored."""
  results = _results_with_errors()
  everything = coco_eval.score_coco(COCO(str(boxes_gt)), results, IMAGE_IDS)
  without_12 = coco_eval.score_coco(COCO(str(boxes_gt)), results, (10, 11))
  assert everything["bbox/AP-dog"] < without_12["bbox/AP-dog"]


def test_ground_truth_from_records_scores_like_the_file(boxes_gt, tmp_path):
  """The tfds path scores against records turned back into COCO; with RLE masks nothing changes."""
  source = coco.load_coco(boxes_gt, tmp_path, train=False)
  rebuilt = coco_eval.coco_from_records(source.records, source.category_map)
  results = _results_with_errors()
  from_file = coco_eval.score_coco(COCO(str(boxes_gt)), results, IMAGE_IDS, iou_types=("bbox", "segm"))
  from_records = coco_eval.score_coco(rebuilt, results, IMAGE_IDS, iou_types=("bbox", "segm"))
  assert from_file.keys() == from_records.keys()
  for key, value in from_file.items():
    assert _same(from_records[key], value), key


def test_no_detections_at_all_score_zero(boxes_gt):
  metrics = coco_eval.score_coco(COCO(str(boxes_gt)), [], IMAGE_IDS, iou_types=("bbox", "segm"))
  assert metrics["bbox/AP"] == 0.0 and metrics["segm/AR"] == 0.0 and metrics["bbox/AP-bird"] == 0.0


# A person keypoint set: two images, three people (medium and large), 17 keypoints with some unlabeled.
KEYPOINT_NAMES = [f"kp{i}" for i in range(17)]
PEOPLE = [(1, (20, 20, 70, 100)), (1, (90, 30, 150, 150)), (2, (10, 40, 120, 150))]  # image id, box XYXY


def _person_keypoints(box, rng):
  x0, y0, x1, y1 = box
  kp = np.zeros((17, 3))
  kp[:, 0] = rng.integers(x0, x1, 17)
  kp[:, 1] = rng.integers(y0, y1, 17)
  kp[:, 2] = np.where(rng.random(17) < 0.8, 2, 0)
  kp[kp[:, 2] == 0] = 0
  return kp


@pytest.fixture(scope="module")
def keypoints_gt(tmp_path_factory):
  rng = np.random.default_rng(0)
  annotations = []
  for n, (image_id, box) in enumerate(PEOPLE):
    kp = _person_keypoints(box, rng)
    w, h = box[2] - box[0], box[3] - box[1]
    annotations.append({"id": n + 1, "image_id": image_id, "category_id": 1, "bbox": [box[0], box[1], w, h],
                        "area": 0.8 * w * h, "iscrowd": 0, "keypoints": kp.reshape(-1).tolist(),
                        "num_keypoints": int((kp[:, 2] > 0).sum())})
  dataset = {"images": [{"id": i, "file_name": f"{i}.png", "height": 160, "width": 160} for i in (1, 2)],
             "annotations": annotations,
             "categories": [{"id": 1, "name": "person", "keypoints": KEYPOINT_NAMES, "skeleton": []}]}
  return _write(tmp_path_factory.mktemp("kp") / "person_keypoints.json", dataset)


def _keypoint_results(gt_path, shifts=(0.0, 0.0, 0.0)):
  gt = json.loads(gt_path.read_text())
  results = []
  for ann, shift, score in zip(gt["annotations"], shifts, (0.9, 0.8, 0.7)):
    kp = np.asarray(ann["keypoints"], np.float64).reshape(17, 3)
    kp[:, :2] += shift
    kp[:, 2] = 1.0  # a detection's third value is its keypoint score, which COCOeval ignores
    results.append({"image_id": ann["image_id"], "category_id": 1, "bbox": ann["bbox"], "score": score,
                    "keypoints": kp.reshape(-1).tolist()})
  return results


def test_perfect_keypoints_score_100(keypoints_gt):
  metrics = coco_eval.score_coco(COCO(str(keypoints_gt)), _keypoint_results(keypoints_gt), (1, 2),
                                 iou_types=("bbox", "keypoints"))
  for name in KEYPOINT_STATS:
    assert metrics[f"keypoints/{name}"] == pytest.approx(100.0), name
  assert metrics["keypoints/AP-person"] == pytest.approx(100.0)
  assert metrics["bbox/AP"] == pytest.approx(100.0)


def test_keypoint_errors_score_what_cocoeval_scores(keypoints_gt):
  results = _keypoint_results(keypoints_gt, shifts=(0.0, 3.0, 9.0))
  metrics = coco_eval.score_coco(COCO(str(keypoints_gt)), results, (1, 2), iou_types=("keypoints",))
  expected = _cocoeval_stats(keypoints_gt, results, "keypoints")
  for name, value in zip(KEYPOINT_STATS, expected):
    assert _same(metrics[f"keypoints/{name}"], value), (name, metrics[f"keypoints/{name}"], value)
  assert 0 < metrics["keypoints/AP"] < 100


# --------------------------------------------------------------------------------------------------------------------
# Evaluation through the pipeline and the Predictor, with a test double for the model.
# --------------------------------------------------------------------------------------------------------------------

FAKE_SIZE = 64
# Five objects in each of two 64 x 64 images, all of category id 5 (label 1): XYXY, also the detections.
FIVE_BOXES = np.array([[2 + 12 * i, 5, 12 + 12 * i, 25] for i in range(5)], np.float32)


@pytest.fixture(scope="module")
def five_gt(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("five")
  annotations = [{"id": 5 * i + j + 1, "image_id": image_id, "category_id": 5, "iscrowd": 0, "area": 200.0,
                  "bbox": [float(b[0]), float(b[1]), 10.0, 20.0]}
                 for i, image_id in enumerate((1, 2)) for j, b in enumerate(FIVE_BOXES)]
  images = [{"id": i, "file_name": f"{i}.png", "height": FAKE_SIZE, "width": FAKE_SIZE} for i in (1, 2)]
  return _write(tmp / "five.json", {"images": images, "annotations": annotations,
                                    "categories": [{"id": 5, "name": "box"}]})


class BlankImages:
  """A loaded COCO source whose images are blank: the test double below does not look at pixels."""

  def __init__(self, source, records=None):
    self.coco, self.category_map = source.coco, source.category_map
    self.records = source.records if records is None else records

  def load_image(self, record):
    return np.zeros((record.height, record.width, 3), np.uint8)


def _fake_config(max_detections=100, masks=False):
  config = ml_collections.ConfigDict()
  config.input = ml_collections.ConfigDict({
      "pixel_format": "RGB", "pixel_scale": 255.0, "pixel_mean": [0.0, 0.0, 0.0], "pixel_std": [1.0, 1.0, 1.0],
      "resize_mode": "detectron2", "min_size_test": FAKE_SIZE, "max_size_test": FAKE_SIZE,
      "canvases": ((FAKE_SIZE, FAKE_SIZE),)})
  config.model = ml_collections.ConfigDict({
      "label_space": "contiguous", "num_classes": 3, "keypoint_head": {"enabled": False},
      "mask_head": {"enabled": masks, "paste_mode": "detectron2", "mask_threshold": 0.5},
      "roi_heads": {"detections_per_image": max_detections}})
  return config


def _fixed_infer(valid=True, boxes=FIVE_BOXES, labels=None):
  """The model's stand-in: the same detections in every image, `boxes` (n, 4) XYXY in canvas pixels (= original
  pixels here) with `labels` (default 1) and scores 0.9, 0.8, ...; full 28 x 28 masks (filling their boxes)."""
  n = len(boxes)
  labels = np.ones(n, np.int32) if labels is None else np.asarray(labels, np.int32)

  def infer(variables, images, image_info):
    del variables, image_info
    b = images.shape[0]
    return {"boxes": jnp.broadcast_to(jnp.asarray(boxes, jnp.float32), (b, n, 4)),
            "scores": jnp.broadcast_to(0.9 - 0.8 / n * jnp.arange(n, dtype=jnp.float32), (b, n)),
            "classes": jnp.broadcast_to(jnp.asarray(labels), (b, n)),
            "valid": jnp.full((b, n), valid),
            "masks": jnp.ones((b, n, 28, 28), jnp.float32)}

  return infer


def _evaluate_fake(gt_path, tmp_path, max_detections=100, records=None, valid=True):
  source = BlankImages(coco.load_coco(gt_path, tmp_path, train=False), records)
  return evaluate.evaluate(_fake_config(max_detections), {}, source, tmp_path / "out", infer_fn=_fixed_infer(valid))


def test_max_detections_follow_the_config(five_gt, tmp_path):
  """Five right detections per image: D = 100 finds all; D = 2 keeps the best two of each image (recall 0.4, and
  precision 1 up to it: 41 of COCO's 101 recall points)."""
  all_five = _evaluate_fake(five_gt, tmp_path, max_detections=100)
  assert all_five["bbox/AP"] == pytest.approx(100.0) and all_five["bbox/AR"] == pytest.approx(100.0)
  assert all_five["bbox/AR@1"] == pytest.approx(20.0) and all_five["bbox/AR@10"] == pytest.approx(100.0)
  best_two = _evaluate_fake(five_gt, tmp_path, max_detections=2)
  assert best_two["bbox/AP"] == pytest.approx(100 * 41 / 101)
  assert best_two["bbox/AR"] == pytest.approx(40.0)
  assert best_two["bbox/AR@1"] == pytest.approx(20.0)
  assert best_two["bbox/AR@10"] == pytest.approx(40.0)  # maxDets[-1] = 2 caps every image first
  assert math.isnan(best_two["bbox/APl"])  # no large object
  assert json.loads((tmp_path / "out" / evaluate.METRICS_FILE).read_text())["max_detections"] == 2


def test_images_without_detections_count_as_misses(five_gt, tmp_path):
  metrics = _evaluate_fake(five_gt, tmp_path, valid=False)
  assert metrics["bbox/AP"] == 0.0 and metrics["bbox/AR"] == 0.0
  assert json.loads((tmp_path / "out" / evaluate.RESULTS_FILE).read_text()) == []
  written = json.loads((tmp_path / "out" / evaluate.METRICS_FILE).read_text())
  assert written["num_images"] == 2 and written["num_detections"] == 0


def test_images_without_an_inference_pass_are_named(five_gt, boxes_gt, tmp_path):
  source = coco.load_coco(five_gt, tmp_path, train=False)
  with pytest.raises(ValueError, match=r"1 of 2 images got no inference pass: image ids 1\b"):
    _evaluate_fake(five_gt, tmp_path, records=source.records[1:])
  assert not (tmp_path / "out").exists()  # nothing written for a wrong evaluation
  # A training-style load skips the image without objects (id 12): evaluating it is refused, naming that image.
  skipping = BlankImages(coco.load_coco(boxes_gt, tmp_path, train=True))
  with pytest.raises(ValueError, match=r"image ids 12\b"):
    evaluate.evaluate(_fake_config(), {}, skipping, None, infer_fn=_fixed_infer())



@pytest.mark.parametrize("offset, explicit, subtracted", [(0.5, None, 0.5), (0.0, None, 0.0), (0.0, 0.25, 0.25)])
def test_predicted_keypoints_lose_the_configs_coordinate_offset(five_gt, tmp_path, monkeypatch, offset, explicit,
                                                                 subtracted):
  """The COCO results hold the predicted keypoints minus model.keypoint_head.coordinate_offset (0.5 in Detectron2's
  configs, 0 in torchvision's; input.resize_mode is "detectron2" in both cases here, and says nothing), or minus an
  explicit keypoint_offset. The images are 64 x 64 at scale 1, so original pixels are canvas pixels."""
  config = _fake_config()
  config.model.keypoint_head = ml_collections.ConfigDict({"enabled": True, "coordinate_offset": offset})
  scored = []
  monkeypatch.setattr(evaluate, "score_coco", lambda coco_gt, results, image_ids, **kw: scored.append(results) or {})
  boxes_only = _fixed_infer()
  points = np.float32([[10.0, 20.0, 0.9], [30.5, 40.0, 0.8]])  # (x, y, score) of each detection's 2 keypoints

  def infer(variables, images, image_info):
    out = boxes_only(variables, images, image_info)
    b, n = out["scores"].shape
    return dict(out, keypoints=jnp.broadcast_to(jnp.asarray(points), (b, n, 2, 3)))

  source = BlankImages(coco.load_coco(five_gt, tmp_path, train=False))
  evaluate.evaluate(config, {}, source, None, infer_fn=infer, keypoint_offset=explicit)
  (results,) = scored
  assert results and all(r["keypoints"] == pytest.approx(
      [10.0 - subtracted, 20.0 - subtracted, 0.9, 30.5 - subtracted, 40.0 - subtracted, 0.8]) for r in results)

class _RecordingPredictor:
  """Stands in for the Predictor in `run_inference`: one detection per image, and host work that waits (up to
  10 s) for the next batch to be dispatched, recording whether it was."""

  def __init__(self):
    self.dispatched = 0
    self.next_dispatched = [threading.Event() for _ in range(8)]
    self.overlapped = []

  def infer_batch(self, images, image_info):
    self.dispatched += 1
    self.next_dispatched[self.dispatched - 1].set()
    b = images.shape[0]
    return {"boxes": np.tile(np.float32([[[0, 0, 10, 10]]]), (b, 1, 1)), "scores": np.ones((b, 1), np.float32),
            "classes": np.ones((b, 1), np.int32), "valid": np.ones((b, 1), bool)}

  def postprocess(self, out, info):
    batch = int(info[0])  # the batch index, stored in image_info by `_batches` below
    last = batch == 2
    self.overlapped.append(last or self.next_dispatched[batch + 1].wait(timeout=10))
    return {"boxes": out["boxes"], "scores": out["scores"], "labels": out["classes"]}


def _batches(num_batches=3, batch_size=2):
  for b in range(num_batches):
    yield {"image": np.zeros((batch_size, 8, 8, 3), np.float32),
           "image_info": np.full((batch_size, 6), b, np.float32),
           "image_id": np.arange(batch_size) + 10 * b,
           "valid": np.array([True] * (batch_size - 1) + [b < num_batches - 1])}  # the last slot pads


def test_host_work_of_a_batch_overlaps_the_next_batch():
  predictor = _RecordingPredictor()
  results, image_ids = evaluate.run_inference(predictor, _batches(), category_ids=(0, 42))
  assert predictor.overlapped == [True] * 5  # batch i + 1 was dispatched before batch i's host work ended
  assert image_ids == [0, 1, 10, 11, 20]  # in order, the padded slot of the last batch dropped
  assert [r["image_id"] for r in results] == image_ids and {r["category_id"] for r in results} == {42}


def test_tfds_source_scores_like_the_json(tmp_path):
  """config.dataset.tfds_data_dir: the same images scored against records rebuilt as COCO, the same numbers as
  against the annotation file (the shapes set's masks are RLE, areas are pixel counts, nothing is dropped)."""
  from mrcnn_jax.data import tfds_coco

  paths = shapes.write_dataset(tmp_path / "set", num_train=0, num_val=2, seed=1, size_hw=(FAKE_SIZE, FAKE_SIZE))
  data_dir = tfds_coco.prepare({"val": (paths["val_annotations"], paths["val_images"])}, tmp_path / "tfds")
  config = _fake_config(masks=True)
  config.dataset = ml_collections.ConfigDict({"tfds_data_dir": str(data_dir), "val_split": "val",
                                              "tfds_config": "instances"})
  source = evaluate.load_eval_source(config)
  assert isinstance(source, tfds_coco.TfdsSource)
  # Every image gets the objects of both images as detections (labels = category ids here): each hits its own.
  gt = json.loads(paths["val_annotations"].read_text())["annotations"]
  boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in gt)]
  infer = _fixed_infer(boxes=boxes, labels=[a["category_id"] for a in gt])
  from_tfds = evaluate.evaluate(config, {}, source, None, infer_fn=infer)
  from_json = evaluate.evaluate(config, {}, coco.load_coco(paths["val_annotations"], paths["val_images"], train=False),
                                None, infer_fn=infer)
  assert from_tfds.keys() == from_json.keys() and 0 < from_json["bbox/AP"] < 100 and 0 < from_json["segm/AP"] < 100
  for key, value in from_json.items():
    assert _same(from_tfds[key], value), key


def test_a_val_set_with_another_number_of_categories_is_refused_before_inference(tiny):
  config, _, paths = tiny
  config = copy.deepcopy(config)
  config.dataset.val_json, config.dataset.val_image_dir = str(paths["val_annotations"]), str(paths["val_images"])
  config.model.num_classes = 1
  with pytest.raises(ValueError, match=rf"^{paths['val_annotations']} \(config.dataset.val_json\): the dataset has 3 "
                                       r"categories \(circle, square, triangle\), the model has 1 \(model.num_classes"):
    evaluate.load_eval_source(config)


def test_a_config_without_a_val_set_takes_the_checkpoints(load_config):
  config = load_config("mask_rcnn_R50_FPN_1x")
  saved = {"dataset": {"val_json": "/data/val.json", "val_image_dir": "/data/val", "tfds_data_dir": None}}
  filled = evaluate._with_saved_val_set(config, saved)
  assert (filled.dataset.val_json, filled.dataset.val_image_dir) == ("/data/val.json", "/data/val")
  named = load_config("mask_rcnn_R50_FPN_1x")
  named.dataset.val_json, named.dataset.val_image_dir = "/mine.json", "/mine"  # what the user names stands
  assert evaluate._with_saved_val_set(named, saved).dataset.val_json == "/mine.json"


def test_image_id_check_names_unknown_and_repeated_images():
  evaluate.check_image_ids([1, 2, 3], [3, 1, 2])
  with pytest.raises(ValueError, match=r"not in the ground truth: image ids 9.*more than once: image ids 2"):
    evaluate.check_image_ids([1, 2, 3], [1, 2, 2, 3, 9])


def test_table_has_detectron2_layout():
  metrics = {"bbox/AP": 38.6473, "bbox/AP50": 59.451, "bbox/AP75": 42.107, "bbox/APs": math.nan,
             "bbox/APm": 42.052, "bbox/APl": 50.049, "bbox/AR": 50.0, "bbox/AP-person": 52.545,
             "bbox/AP-bicycle": 28.808, "bbox/AP-car": 42.316, "bbox/AP-motorcycle": 40.1}
  assert coco_eval.format_table(metrics).splitlines() == [
      "Evaluation results for bbox:",
      "|   AP   |  AP50  |  AP75  |  APs  |  APm   |  APl   |",
      "|:------:|:------:|:------:|:-----:|:------:|:------:|",
      "| 38.647 | 59.451 | 42.107 |  nan  | 42.052 | 50.049 |",
      "Per-category bbox AP:",
      "| category   | AP     | category   | AP     | category   | AP     |",
      "|:-----------|:-------|:-----------|:-------|:-----------|:-------|",
      "| person     | 52.545 | bicycle    | 28.808 | car        | 42.316 |",
      "| motorcycle | 40.100 |            |        |            |        |",
  ]


# --------------------------------------------------------------------------------------------------------------------
# End to end: a tiny random-init Mask R-CNN on a tiny shapes set, in this process and through the command line.
# --------------------------------------------------------------------------------------------------------------------

TINY = 64
NUM_VAL = 3
# The tiny model as overrides of the base config, applied alike here and on the command line.
OVERRIDES = tiny_model.overrides(TINY, TINY)


def _tiny_config():
  return tiny_model.config(OVERRIDES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, host variables, shapes dataset paths). The box regression is zeroed: random deltas squash boxes to
  zero height here, which leaves no detection; without them the detections are the (non-empty) proposals."""
  config = _tiny_config()
  variables = mask_rcnn.random_variables(config, 0)
  variables["params"]["box_head"]["bbox_pred"] = jax.tree.map(np.zeros_like,
                                                              variables["params"]["box_head"]["bbox_pred"])
  paths = shapes.write_dataset(tmp_path_factory.mktemp("shapes") / "set", num_train=0, num_val=NUM_VAL, seed=0,
                               size_hw=(TINY, TINY))
  return config, variables, paths


def _expected_keys():
  keys = set()
  for task in ("bbox", "segm"):
    keys |= {f"{task}/{name}" for name in BOX_STATS}
    keys |= {f"{task}/AP-{name}" for name in shapes.CLASSES}
  return keys


def test_end_to_end_on_shapes(tiny, tmp_path):
  config, variables, paths = tiny
  source = coco.load_coco(paths["val_annotations"], paths["val_images"], train=False)
  metrics = evaluate.evaluate(config, variables, source, tmp_path)

  assert set(metrics) == _expected_keys()
  results = json.loads((tmp_path / evaluate.RESULTS_FILE).read_text())
  written = json.loads((tmp_path / evaluate.METRICS_FILE).read_text())
  assert written["num_images"] == NUM_VAL and written["num_detections"] == len(results)
  assert written["iou_types"] == ["bbox", "segm"] and written["max_detections"] == 10
  assert set(written["metrics"]) == _expected_keys()
  assert {r["image_id"] for r in results} <= {1, 2, 3}
  assert all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)
  assert results and all(r["segmentation"]["size"] == [TINY, TINY] for r in results)
  # The written results scored by pycocotools directly, with its standard maxDets [1, 10, 100]: with at most
  # D = 10 detections per image, AP and AR at 100 are those at D.
  for task, direct in (("bbox", results), ("segm", _without_bbox(results))):
    expected = _cocoeval_stats(paths["val_annotations"], direct, task)
    for name, value in zip(BOX_STATS, expected):
      assert _same(metrics[f"{task}/{name}"], value), (task, name)


def test_command_line_without_config_takes_the_checkpoints(tiny, tmp_path):
  """The checkpoint carries its config, val set included (as a training run's does): `--checkpoint` is enough, no
  training override repeated."""
  config, variables, paths = tiny
  saved = copy.deepcopy(config)
  saved.dataset.val_json, saved.dataset.val_image_dir = str(paths["val_annotations"]), str(paths["val_images"])
  ckpt = checkpoint.save_variables(tmp_path / "ckpt", variables, config=saved)
  # A fresh interpreter outside the checkout: the source tree's mrcnn_jax has no kernels/ subpackage.
  done = subprocess.run(
      [sys.executable, "-m", "mrcnn_jax.evaluate", f"--checkpoint={ckpt}"],
      cwd=tmp_path, capture_output=True, text=True, env=command_env(),
      timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Evaluation results for bbox:" in done.stdout and "Per-category segm AP:" in done.stdout
  out = ckpt / "eval"  # the default output folder of a variables checkpoint
  written = json.loads((out / evaluate.METRICS_FILE).read_text())
  assert written["num_images"] == NUM_VAL and set(written["metrics"]) == _expected_keys()
  assert len(json.loads((out / evaluate.RESULTS_FILE).read_text())) == written["num_detections"]


def test_command_line_names_a_misspelt_override(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "mrcnn_jax.evaluate", f"--config={BASE_CONFIG}", f"--checkpoint={tmp_path}",
       "--config.model.roi_heads.detections_per_imag=5"],
      cwd=tmp_path, capture_output=True, text=True, env=command_env(),
      timeout=300, check=False)
  assert done.returncode != 0 and "detections_per_imag" in done.stderr


# --------------------------------------------------------------------------------------------------------------------
# checkpoint.load_inference
# --------------------------------------------------------------------------------------------------------------------


def _variables(seed):
  rng = np.random.default_rng(seed)
  return {"params": {"box_head": {"fc1": {"kernel": rng.standard_normal((6, 4)).astype(np.float32),
                                          "bias": rng.standard_normal(4).astype(np.float32)}}},
          "batch_stats": {"backbone": {"stem_norm": {"mean": rng.standard_normal(8).astype(np.float32)}}}}


def _assert_variables_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert isinstance(g, np.ndarray) and g.dtype == w.dtype
    np.testing.assert_array_equal(g, w)


def test_load_inference_from_a_variables_checkpoint(tmp_path):
  variables = _variables(0)
  checkpoint.save_variables(tmp_path / "ckpt", variables, config={"model": {"num_classes": 3}})
  loaded, config = checkpoint.load_inference(tmp_path / "ckpt")
  _assert_variables_equal(loaded, variables)
  assert config == {"model": {"num_classes": 3}}
  checkpoint.save_variables(tmp_path / "bare", variables)
  assert checkpoint.load_inference(tmp_path / "bare")[1] is None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A training workdir with steps 3 and 6 (different variables), saved as the trainer saves its TrainState."""
  workdir = tmp_path_factory.mktemp("run")
  with train_checkpoint.TrainCheckpointer(workdir, async_save=False) as ckpt:
    for step, seed in ((3, 1), (6, 2)):
      v = _variables(seed)
      state = TrainState(step=jnp.asarray(step, jnp.int32), params=v["params"], batch_stats=v["batch_stats"],
                         opt_state=optax.sgd(0.1, momentum=0.9).init(v["params"]))
      ckpt.save(step, state, config={"train": {"seed": seed}}, force=True)
  return workdir


@pytest.mark.parametrize("where, seed", [("", 2), ("checkpoints", 2), ("checkpoints/6", 2), ("checkpoints/3", 1)])
def test_load_inference_from_a_training_run(workdir, where, seed):
  loaded, config = checkpoint.load_inference(workdir / where)
  _assert_variables_equal(loaded, _variables(seed))  # the latest step, or the one named; no optimizer state
  assert config == {"train": {"seed": seed}}


def test_load_inference_names_what_it_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"no checkpoint directory {tmp_path / 'nowhere'}.*expected a variables"):
    checkpoint.load_inference(tmp_path / "nowhere")
  (tmp_path / "other").mkdir()
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'other'} is not a checkpoint directory.*training workdir"):
    checkpoint.load_inference(tmp_path / "other")
  (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="holds no finished training step"):
    checkpoint.load_inference(tmp_path / "fresh")
