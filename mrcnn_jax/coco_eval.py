"""COCO scoring as Detectron2 does it: pycocotools' COCOeval, Detectron2's metric names, and its report tables.

  source --ground_truth--> pycocotools COCO: the annotation file (`coco.CocoSource.coco`), or built from the
         source's records (`coco_from_records`, e.g. a tfds source)
  ground truth, results, image ids --score_coco (COCOeval per iou type, then `summarize`)--> {"bbox/AP": 38.6, ...}
  metrics --format_table--> "Evaluation results for bbox:" and per-category tables

The results come from `predictor.to_coco_results`; the loop that makes them over a dataset is `mrcnn_jax.evaluate`.

Scoring follows Detectron2's COCOEvaluator:
  * the images scored are exactly the ground truth's N images (COCOeval's params.imgIds; an image that got no
    inference pass is an error, `evaluate.check_image_ids`); an image with no detection counts its objects as misses;
  * bbox and segm use params.maxDets = [1, 10, D], D = config.model.roi_heads.detections_per_image (values above D
    left out: COCOeval sorts maxDets and scores maxDets[-1] detections per image). COCOeval's own summarize() reads
    AP at maxDets=100 whatever maxDets holds, so the summary here is computed from eval["precision"] /
    eval["recall"] at D (`summarize`); with D = 100 it equals summarize()'s numbers;
  * keypoints keep COCO's keypoint protocol, maxDets [20] (as Detectron2 does), over the categories that declare
    keypoints, with COCO's OKS sigmas for 17 keypoints;
  * segm drops each result's bbox first, so that a detection's area (for APs / APm / APl) is its mask's area;
  * names and scale are Detectron2's: "bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl", the
    same under "segm/", "keypoints/AP", "keypoints/AP50", "keypoints/AP75", "keypoints/APm", "keypoints/APl", and
    per category "bbox/AP-<name>" (also segm, keypoints), in percent (0..100); NaN where COCOeval has -1 (no
    ground truth in that area range or category). Recalls come along: "bbox/AR@1", "bbox/AR@10", "bbox/AR" (at D),
    "bbox/ARs", "bbox/ARm", "bbox/ARl"; "keypoints/AR", "keypoints/AR50", "keypoints/AR75", "keypoints/ARm",
    "keypoints/ARl";
  * no detection at all scores 0 (COCOeval's answer for an empty result set; Detectron2 reports NaN there, because
    pycocotools' loadRes cannot load an empty list).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import tabulate

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm", "keypoints")
# Detectron2's summary metrics per task, in its order (`COCOEvaluator._derive_coco_results`).
AP_METRICS = {"bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
              "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
              "keypoints": ("AP", "AP50", "AP75", "APm", "APl")}
# COCO's keypoint benchmark scores the 20 best detections per image (COCOeval's default for keypoints).
KEYPOINT_MAX_DETS = 20


# --------------------------------------------------------------------------------------------------------------------
# Ground truth and scoring.
# --------------------------------------------------------------------------------------------------------------------


def ground_truth(source):
  """The pycocotools COCO ground truth of a source: `source.coco` (the whole annotation file, nothing dropped) when
  it has one (`coco.CocoSource`), else built from its records (`coco_from_records`, e.g. a `tfds_coco.TfdsSource`)."""
  coco_gt = getattr(source, "coco", None)
  if coco_gt is not None:
    return coco_gt
  return coco_from_records(source.records, source.category_map, getattr(source, "categories", None))


def coco_from_records(records, category_map, categories: Sequence[dict] | None = None):
  """A pycocotools COCO ground truth from `ImageRecord`s (for sources without their annotation file).

  records: ImageRecords (boxes XYXY in original pixels, contiguous labels, masks as RLE or None, keypoints (n, K, 3)
    or None). category_map: labels -> category ids and names. categories: the annotation file's category dicts
    (keeping their "keypoints" names); by default built from category_map.
  Each instance becomes an annotation with bbox XYWH, iscrowd, segmentation (its RLE) and area (the mask's pixel
  count, else the box's area), keypoints and num_keypoints (the labeled ones) when the records have keypoints. Not
  identical to the original file: COCO's areas come from polygons, and instances a source dropped (boxes under
  min_box_size) are missing, so scores can differ slightly from those on the JSON.
  """
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel

  if categories is None:
    categories = [{"id": c, "name": n} for c, n in zip(category_map.category_ids, category_map.names)]
  images, annotations = [], []
  for record in records:
    images.append({"id": record.image_id, "file_name": record.file_name, "height": record.height,
                   "width": record.width})
    boxes = np.asarray(record.boxes, np.float64).reshape(-1, 4)
    for i in range(record.num_instances):
      x1, y1, x2, y2 = boxes[i].tolist()
      ann = {"id": len(annotations) + 1, "image_id": record.image_id,
             "category_id": category_map.to_category_id(int(record.classes[i])),
             "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(record.is_crowd[i]), "area": (x2 - x1) * (y2 - y1)}
      if record.masks is not None:
        rle = dict(record.masks[i])
        ann["area"] = float(mask_util.area(rle))
        counts = rle["counts"]
        ann["segmentation"] = {"size": list(rle["size"]),
                               "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
      if record.keypoints is not None:
        keypoints = np.asarray(record.keypoints[i], np.float64)
        ann["keypoints"] = keypoints.reshape(-1).tolist()
        ann["num_keypoints"] = int((keypoints[:, 2] > 0).sum())
      annotations.append(ann)
  coco = COCO()
  coco.dataset = {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}
  with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
    coco.createIndex()
  return coco


def iou_types(config) -> tuple[str, ...]:
  """What a config's model is scored on: bbox, then segm (mask head on), then keypoints (keypoint head on)."""
  types = ("bbox",)
  if config.model.mask_head.enabled:
    types += ("segm",)
  if config.model.keypoint_head.enabled:
    types += ("keypoints",)
  return types


def score_coco(coco_gt, results: Sequence[dict], image_ids: Sequence[int], *, iou_types: Sequence[str] = ("bbox",),
               max_detections: int = 100, kpt_oks_sigmas=None, return_evals: bool = False):
  """Score COCO results with pycocotools' COCOeval, Detectron2's way (see the module docstring).

  Args:
    coco_gt: the pycocotools COCO ground truth.
    results: COCO result dicts (image_id, category_id, bbox XYWH, score; segmentation for "segm", keypoints for
      "keypoints"), e.g. from `predictor.to_coco_results`. Not modified.
    image_ids: the images scored (COCOeval's params.imgIds): all of the set's, also those without detections.
    iou_types: any of "bbox", "segm", "keypoints".
    max_detections: D, the model's detections per image: bbox and segm use maxDets [1, 10, D] (without values > D).
    kpt_oks_sigmas: (K,) OKS sigmas; None: COCO's, which needs K = 17.
    return_evals: also return the COCOeval objects ({iou_type: COCOeval}).

  Returns:
    The flat metrics dict ("bbox/AP", ..., "bbox/AP-<category name>", ...), percent, NaN where undefined; with
    return_evals, (metrics, evals).
  """
  unknown = [t for t in iou_types if t not in IOU_TYPES]
  if unknown:
    raise ValueError(f"unknown iou types {unknown}; expected some of {IOU_TYPES}")
  if int(max_detections) < 1:
    raise ValueError(f"max_detections must be >= 1, got {max_detections}")
  image_ids = sorted({int(i) for i in image_ids})
  metrics, evals = {}, {}
  for iou_type in iou_types:
    start = time.perf_counter()
    coco_eval = _run_cocoeval(coco_gt, results, image_ids, iou_type, int(max_detections), kpt_oks_sigmas)
    evals[iou_type] = coco_eval
    metrics.update({f"{iou_type}/{k}": v for k, v in summarize(coco_eval).items()})
    log.info("COCOeval %s over %d images: %.1f s", iou_type, len(image_ids), time.perf_counter() - start)
  return (metrics, evals) if return_evals else metrics


def _run_cocoeval(coco_gt, results, image_ids, iou_type, max_detections, kpt_oks_sigmas):
  """COCOeval of one iou type, evaluated and accumulated (not summarized: see `summarize`)."""
  from pycocotools.cocoeval import COCOeval  # pylint: disable=import-outside-toplevel

  field = {"segm": "segmentation", "keypoints": "keypoints"}.get(iou_type)
  if field is not None and any(field not in r for r in results):
    raise ValueError(f"{iou_type} evaluation needs {field!r} in every result (is that head on?)")
  # loadRes adds fields to the dicts it is given: shallow copies keep the caller's results as they were.
  results = [dict(r) for r in results]
  if iou_type == "segm":
    for r in results:
      r.pop("bbox", None)  # loadRes then takes the area (APs/m/l) and the box from the mask, as Detectron2 does
  coco_dt = _load_results(coco_gt, results)

  quiet = io.StringIO()  # COCOeval prints its progress; it goes to the debug log instead
  coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
  coco_eval.params.imgIds = list(image_ids)
  if iou_type == "keypoints":
    coco_eval.params.catIds = _keypoint_categories(coco_gt)
    num_keypoints = len(coco_gt.cats[coco_eval.params.catIds[0]]["keypoints"])
    sigmas = coco_eval.params.kpt_oks_sigmas if kpt_oks_sigmas is None else np.asarray(kpt_oks_sigmas, np.float64)
    if len(sigmas) != num_keypoints:
      raise ValueError(f"the ground truth has {num_keypoints} keypoints but {len(sigmas)} OKS sigmas are given "
                       "(COCO's are for 17); pass kpt_oks_sigmas")
    coco_eval.params.kpt_oks_sigmas = sigmas
    coco_eval.params.maxDets = [KEYPOINT_MAX_DETS]
  else:
    # evaluateImg keeps each image's best maxDets[-1] detections per category, after evaluate() sorts maxDets: so D
    # must be the largest (Detectron2's [1, 10, D] scores 10 detections per image when D < 10).
    coco_eval.params.maxDets = sorted({1, min(10, max_detections), max_detections})
  with contextlib.redirect_stdout(quiet):
    coco_eval.evaluate()
    coco_eval.accumulate()
  log.debug("%s", quiet.getvalue())
  return coco_eval


def _load_results(coco_gt, results):
  """coco_gt.loadRes(results), or an empty result set (loadRes cannot load an empty list)."""
  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel

  with contextlib.redirect_stdout(io.StringIO()):
    if results:
      return coco_gt.loadRes(results)
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(
        coco_gt.dataset["categories"]), "annotations": []}
    coco_dt.createIndex()
  return coco_dt


def _keypoint_categories(coco_gt) -> list[int]:
  """Category ids that declare keypoints (COCOeval reads the keypoints of every annotation of a scored category)."""
  ids = sorted(c for c, cat in coco_gt.cats.items() if cat.get("keypoints"))
  if not ids:
    raise ValueError("keypoint evaluation needs a ground truth whose categories declare 'keypoints' (e.g. "
                     "person_keypoints_val2017.json)")
  return ids


def summarize(coco_eval) -> dict[str, float]:
  """An accumulated COCOeval's summary at its last maxDets, in percent, NaN where COCOeval has -1.

  bbox / segm: AP, AP50, AP75, APs, APm, APl, AR@1, AR@10, AR, ARs, ARm, ARl (AP and AR at maxDets[-1] = D; AR@n
  at maxDets min(n, D)); keypoints: AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl. Plus "AP-<name>"
  per category of params.catIds: the mean of precision[:, :, k, area "all", maxDets[-1]] over the entries > -1, as
  Detectron2's per-category AP. The same operations as COCOeval.summarize, so with maxDets [1, 10, 100] (or [20] for
  keypoints) the values are its `stats` times 100.
  """
  p = coco_eval.params
  precision = coco_eval.eval["precision"]  # (T iou thresholds, R recall points, K categories, A areas, M maxDets)
  recall = coco_eval.eval["recall"]  # (T, K, A, M)
  last = len(p.maxDets) - 1

  def mean(values):
    values = values[values > -1]
    return float(np.mean(values) * 100) if values.size else math.nan

  def ap(iou=None, area="all", m=last):
    s = precision if iou is None else precision[np.where(iou == p.iouThrs)[0]]
    return mean(s[:, :, :, p.areaRngLbl.index(area), m])

  def ar(iou=None, area="all", m=last):
    s = recall if iou is None else recall[np.where(iou == p.iouThrs)[0]]
    return mean(s[:, :, p.areaRngLbl.index(area), m])

  def ar_at(n):  # AR@n: at most n detections per image, or all D of them when D < n
    m = [i for i, d in enumerate(p.maxDets) if d == min(n, p.maxDets[-1])]
    return ar(m=m[0]) if m else math.nan

  if p.iouType == "keypoints":
    out = {"AP": ap(), "AP50": ap(iou=0.5), "AP75": ap(iou=0.75), "APm": ap(area="medium"), "APl": ap(area="large"),
           "AR": ar(), "AR50": ar(iou=0.5), "AR75": ar(iou=0.75), "ARm": ar(area="medium"), "ARl": ar(area="large")}
  else:
    out = {"AP": ap(), "AP50": ap(iou=0.5), "AP75": ap(iou=0.75), "APs": ap(area="small"), "APm": ap(area="medium"),
           "APl": ap(area="large"), "AR@1": ar_at(1), "AR@10": ar_at(10), "AR": ar(), "ARs": ar(area="small"),
           "ARm": ar(area="medium"), "ARl": ar(area="large")}
  cats = coco_eval.cocoGt.cats
  for k, cat_id in enumerate(p.catIds):
    out[f"AP-{cats[cat_id].get('name', cat_id)}"] = mean(precision[:, :, k, 0, last])
  return out


# --------------------------------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------------------------------


def format_table(metrics: dict[str, float]) -> str:
  """Detectron2-style tables of a metrics dict, as one string.

  Per task present (bbox, segm, keypoints): "Evaluation results for <task>:" and a one-row markdown table of its AP
  metrics (like Detectron2's `create_small_table`: centred, 3 decimals), then "Per-category <task> AP:" and a table
  of (category, AP) pairs, three pairs per row, as Detectron2 logs them.
  """
  lines = []
  for task in IOU_TYPES:
    names = [n for n in AP_METRICS[task] if f"{task}/{n}" in metrics]
    if not names:
      continue
    lines.append(f"Evaluation results for {task}:")
    lines.append(_pipe_table(names, [[metrics[f"{task}/{n}"] for n in names]], "center"))
    per_category = [(k[len(task) + 4:], v) for k, v in metrics.items() if k.startswith(f"{task}/AP-")]
    if per_category:
      pairs = min(3, len(per_category))
      flat = [x for pair in per_category for x in pair]
      rows = [flat[i:i + 2 * pairs] for i in range(0, len(flat), 2 * pairs)]
      lines.append(f"Per-category {task} AP:")
      lines.append(_pipe_table(["category", "AP"] * pairs, rows, "left"))
  return "\n".join(lines)


def _pipe_table(headers: Sequence[str], rows: Sequence[Sequence], align: str) -> str:
  """A GitHub ("pipe") table by tabulate, as Detectron2 draws it: floats with 3 decimals, every column aligned
  `align`, missing cells of a short last row left blank."""
  return tabulate.tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".3f", numalign=align, stralign=align)
