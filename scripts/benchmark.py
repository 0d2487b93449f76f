#!/usr/bin/env python
"""mrcnn_jax beside torchvision, in one run on one machine: each figure is the median of warm runs, compile apart.

Usage:
  python scripts/benchmark.py ops [--repeats 7] [--impl xla|pallas] [--json results.json]
  python scripts/benchmark.py model [--repeats 5] [--batches 1 2] [--json results.json]
  python scripts/benchmark.py data
  python scripts/benchmark.py train --batches 2

Groups:
  ops    RoIAlign (features 1x200x336x256, 1,000 boxes, 7x7, sampling_ratio 2, aligned False/True, forward and
         forward+backward), NMS on 4,000 boxes, paste of 100 28x28 masks into 800x1333.
         On a GPU it also times the Pallas RoIAlign kernel against the XLA path.
  model  R50-FPN Mask R-CNN and Keypoint R-CNN inference, each side on its own defaults, on a 640x480 image (COCO's
         most common size; torchvision resizes it to 800x1066 and pads to 800x1088) and an 800x1333 one, batch 1 and
         2: torchvision's maskrcnn_resnet50_fpn / keypointrcnn_resnet50_fpn (score threshold 0 for the keypoint
         model) with random weights spread so that they return 100 detections per image (the mask and keypoint
         heads work on all of them), converted with convert_state_dict and run with the shipped
         configs/torchvision_maskrcnn_r50_fpn.py / torchvision_keypointrcnn_r50_fpn.py (score threshold 0 for the
         keypoints too), on the canvas each picks (noted per row). Timed on both sides: the model on the padded
         batch, without transform and postprocess (torchvision: backbone + rpn + roi_heads, keypoint decoding
         included; mrcnn_jax: the jitted `build_infer`, NHWC). Each side runs in its own subprocess, so that its peak
         RSS (in the note) is its own. At batch 1 it also times Mask R-CNN's stages apart (each jitted alone on our
         side): backbone+FPN, RPN head + proposals, box head + detection, mask head (RoIAlign 14x14 included).
         Default --repeats here is 5; --models, --images and --batches narrow the run.
  data   The training loader (grain, 2 workers): batches/s on COCO-like input (synthetic 640x480 images resized to
         800x1333 on the 1344x1344 canvas, batch 2) and on the shapes set (128x128, batch 8), and the per-image cost
         of decode, resize and the whole train_example (resize, flip, normalize, pad, mask crops). No torch side.
  train  One training step of R50-FPN Mask R-CNN at 512x512 (torchvision conventions, random init, FrozenBN and
         stem + res2 frozen on both sides, 3 instances per image, 512 sampled RoIs per image): torchvision's
         forward + backward + SGD step vs mrcnn_jax's jitted `train_step` (compile apart); each side in its own
         subprocess (peak RSS). --train_hw 800 1344 times the COCO-sized canvas.

torch runs with as many threads as JAX's CPU client uses (all cores). Both sides' processes run with the same host
allocator setting: --host_malloc=reuse (default; `mrcnn_jax.host_memory`, what `mrcnn_jax.main` uses) keeps freed
memory in the process, so that neither side page-faults its buffers afresh every step; --host_malloc=system leaves
glibc's defaults on both sides. The ratio column is mrcnn_jax / torchvision:
below 1.0 means mrcnn_jax is faster. torch and torchvision are needed here (the `parity` extra); the library itself
never imports them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

# The package imports no JAX on import: the torch workers stay free of it.
from mrcnn_jax import atomic, host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]


def _import_jax() -> None:
  """Bind the module globals `jax` and `jnp`. Imported on demand, not at the top, so that the torch worker of the
  `model` group (whose peak RSS is measured) does not carry JAX."""
  global jax, jnp
  import jax
  import jax.numpy as jnp


@dataclasses.dataclass
class Row:
  name: str
  jax_ms: float
  torch_ms: float | None
  compile_s: float
  note: str = ""

  @property
  def ratio(self) -> float | None:
    return None if self.torch_ms is None else self.jax_ms / self.torch_ms


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def time_jax(jitted, args, repeats: int) -> tuple[float, float]:
  """(median warm ms, compile s) of a jitted function; compile time is lower + compile, apart from any run."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # one warm-up run
  ms = _median_ms(lambda: jax.block_until_ready(compiled(*args)), repeats)
  return ms, compile_s


def time_torch(fn: Callable[[], object], repeats: int) -> float:
  fn()  # warm-up
  return _median_ms(fn, repeats)


# ------------------------------------------------------------------------------------------------------------------
# ops
# ------------------------------------------------------------------------------------------------------------------


def _random_boxes(rng, n, image_hw, min_size, max_size):
  h, w = image_hw
  xy = rng.uniform(0, 1, (n, 2)) * np.array([w - min_size, h - min_size])
  wh = rng.uniform(min_size, max_size, (n, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1)
  return boxes.astype(np.float32)


def bench_roi_align(rng, repeats, impl, torch, torchvision) -> list[Row]:
  from mrcnn_jax.ops import roi_align as ra

  features = rng.standard_normal((1, 200, 336, 256)).astype(np.float32)
  boxes = _random_boxes(rng, 1000, (800, 1344), 16, 400)
  cotangent = rng.standard_normal((1, 1000, 7, 7, 256)).astype(np.float32)
  f, b, g = jnp.asarray(features), jnp.asarray(boxes[None]), jnp.asarray(cotangent)
  f_t = torch.tensor(features).permute(0, 3, 1, 2).contiguous()
  b_t = [torch.tensor(boxes)]
  g_t = torch.tensor(cotangent).reshape(1000, 7, 7, 256).permute(0, 3, 1, 2).contiguous()
  rows = []
  impls = [impl] if impl == "xla" or jax.default_backend() == "cpu" else ["xla", impl]
  for aligned in (False, True):
    def forward(x, boxes, aligned=aligned, impl=None):
      return ra.roi_align(x, boxes, 7, 0.25, 2, aligned, impl=impl)

    def forward_backward(x, boxes, cot, aligned=aligned, impl=None):
      out, vjp = jax.vjp(lambda y: forward(y, boxes, aligned, impl), x)
      return out, vjp(cot)[0]

    def torch_forward(aligned=aligned):
      return torchvision.ops.roi_align(f_t, b_t, 7, 0.25, 2, aligned)

    def torch_forward_backward(aligned=aligned):
      x = f_t.detach().requires_grad_(True)
      torchvision.ops.roi_align(x, b_t, 7, 0.25, 2, aligned).backward(g_t)
      return x.grad

    t_fwd = time_torch(torch_forward, repeats)
    t_fb = time_torch(torch_forward_backward, repeats)
    for name in impls:
      ms, cs = time_jax(jax.jit(lambda x, bx, name=name: forward(x, bx, impl=name)), (f, b), repeats)
      rows.append(Row(f"roi_align aligned={aligned} forward [{name}]", ms, t_fwd, cs))
      ms, cs = time_jax(jax.jit(lambda x, bx, c, name=name: forward_backward(x, bx, c, impl=name)), (f, b, g), repeats)
      rows.append(Row(f"roi_align aligned={aligned} fwd+bwd [{name}]", ms, t_fb, cs))
  return rows


def bench_nms(rng, repeats, torch, torchvision) -> list[Row]:
  from mrcnn_jax.ops import nms

  # RPN-like input: 4,000 proposals clustered around 300 objects, so that NMS has real work to do.
  centres = _random_boxes(rng, 300, (800, 1333), 20, 300)
  boxes = centres[rng.integers(0, 300, 4000)] + rng.normal(0, 8, (4000, 4)).astype(np.float32)
  scores = rng.random(4000).astype(np.float32)
  rows = []
  for threshold, max_out in ((0.7, 4000), (0.7, 1000), (0.5, 4000)):
    kept = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), threshold)
    t_ms = time_torch(lambda: torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), threshold), repeats)
    fn = jax.jit(lambda bx, sc, threshold=threshold, max_out=max_out: nms.nms(bx, sc, threshold, max_out))
    ms, cs = time_jax(fn, (jnp.asarray(boxes), jnp.asarray(scores)), repeats)
    ours = np.asarray(fn(jnp.asarray(boxes), jnp.asarray(scores)))
    n = min(max_out, len(kept))
    same = bool(np.array_equal(ours[:n], kept.numpy()[:n]))
    rows.append(Row(f"nms 4000 boxes iou={threshold} max_out={max_out}", ms, t_ms, cs,
                    f"torchvision keeps {len(kept)}; same first {n}: {same}"))
  return rows


def bench_paste(rng, repeats, torch, torchvision) -> list[Row]:
  from torchvision.models.detection.roi_heads import paste_masks_in_image

  from mrcnn_jax.ops import masks

  image_hw = (800, 1333)
  mask_probs = rng.random((100, 28, 28)).astype(np.float32)
  boxes = _random_boxes(rng, 100, image_hw, 20, 400)
  m_t, b_t = torch.tensor(mask_probs)[:, None], torch.tensor(boxes)
  t_float = time_torch(lambda: paste_masks_in_image(m_t, b_t, image_hw), repeats)
  t_bool = time_torch(lambda: paste_masks_in_image(m_t, b_t, image_hw) > 0.5, repeats)
  rows = []
  for mode, threshold, t_ms in (("torchvision", None, t_float), ("torchvision", 0.5, t_bool),
                                ("detectron2", 0.5, t_bool)):
    fn = jax.jit(lambda m, bx, mode=mode, threshold=threshold: masks.paste_masks(m, bx, image_hw, threshold, mode))
    ms, cs = time_jax(fn, (jnp.asarray(mask_probs), jnp.asarray(boxes)), repeats)
    note = "vs torchvision's paste_masks_in_image" + ("" if threshold is None else " > 0.5")
    rows.append(Row(f"paste 100 masks 800x1333 mode={mode} threshold={threshold}", ms, t_ms, cs, note))
  return rows


def run_ops(args) -> list[Row]:
  import torch
  import torchvision

  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  rows = bench_roi_align(rng, args.repeats, args.impl, torch, torchvision)
  rows += bench_nms(rng, args.repeats, torch, torchvision)
  rows += bench_paste(rng, args.repeats, torch, torchvision)
  return rows


# ------------------------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------------------------

# The shipped torchvision configs, unchanged (loaded by path, as the entry points load them), against torchvision's
# models at their defaults (min_size 800, max_size 1333).
MODEL_CONFIGS = {"mask": REPO / "configs" / "torchvision_maskrcnn_r50_fpn.py",
                 "keypoint": REPO / "configs" / "torchvision_keypointrcnn_r50_fpn.py"}
# Image sizes (H, W): COCO's most common 640x480, and a full-size 800x1333.
MODEL_IMAGES = {"640x480": (480, 640), "1333x800": (800, 1333)}
STAGES = ("backbone+FPN", "RPN head + proposals", "box head + detect", "mask head")


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def _torchvision_model(kind, torch, torchvision):
  """torchvision's model at its defaults; the keypoint model keeps every box (score threshold 0), so that it returns
  100 detections as the benchmark's mrcnn_jax side does."""
  if kind == "mask":
    return torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
  return torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                box_score_thresh=0.0).eval()


def _spread_weights(model, seed, torch, torchvision) -> None:
  """Random FrozenBN statistics, classifier weights spread (as in the parity test) so that the random model returns
  detections: it returns the full 100 per image, so both mask (keypoint) heads work on 100 boxes."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, (torch.nn.BatchNorm2d, torchvision.ops.misc.FrozenBatchNorm2d)):
        c = mod.weight.shape[0]
        mod.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
        mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
        mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        mod.running_var.copy_(torch.rand(c, generator=g) + 1.0)
    model.rpn.head.bbox_pred.weight.mul_(0.1)
    predictor = model.roi_heads.box_predictor
    predictor.cls_score.weight.mul_(2.0)
    predictor.cls_score.bias.copy_(torch.randn(predictor.cls_score.bias.shape, generator=g))


def _prepare_model_data(data_dir: pathlib.Path, kind: str, image_hw, batch: int) -> None:
  """Weights (state_dict.npz, once per kind) and the batch's images (images.npz, H x W x 3 float in [0, 1]), shared
  by the two workers."""
  import torch
  import torchvision

  weights = data_dir / f"{kind}_state_dict.npz"
  if not weights.exists():
    torch.manual_seed(0)
    model = _torchvision_model(kind, torch, torchvision)
    _spread_weights(model, 1, torch, torchvision)
    np.savez(weights, **{k: v.numpy() for k, v in model.state_dict().items()})
  rng = np.random.default_rng(0)
  np.save(data_dir / "images.npy", rng.random((batch,) + tuple(image_hw) + (3,), np.float32))


def _worker_torch(data_dir: pathlib.Path, kind: str, batch: int, repeats: int, stages: bool) -> dict:
  """torchvision's model on its own transformed (resized, normalized, padded) batch: backbone + rpn + roi_heads
  (keypoint decoding included; the transform and the mask paste of postprocess excluded, as on our side)."""
  import torch
  import torchvision
  from torchvision.models.detection.roi_heads import maskrcnn_inference

  torch.set_num_threads(os.cpu_count() or 1)
  model = _torchvision_model(kind, torch, torchvision)
  with np.load(data_dir / f"{kind}_state_dict.npz") as sd:
    model.load_state_dict({k: torch.from_numpy(sd[k]) for k in sd.files})
  images = [torch.from_numpy(x).permute(2, 0, 1) for x in np.load(data_dir / "images.npy")[:batch]]
  with torch.no_grad():
    image_list, _ = model.transform(images)
  sizes = image_list.image_sizes

  @torch.no_grad()
  def forward():
    feats = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, feats)
    detections, _ = model.roi_heads(feats, proposals, sizes)
    return detections

  ms = time_torch(forward, repeats)
  detections = forward()
  result = {"ms": ms, "peak_rss_gb": _peak_rss_gb(), "detections": [len(d["boxes"]) for d in detections],
            "padded_hw": list(image_list.tensors.shape[2:])}
  np.savez(data_dir / "boxes_torch.npz", *[d["boxes"].numpy() for d in detections])
  if stages and kind == "mask":
    rh = model.roi_heads

    @torch.no_grad()
    def staged():
      t = [time.perf_counter()]
      feats = model.backbone(image_list.tensors)
      t.append(time.perf_counter())
      proposals, _ = model.rpn(image_list, feats)
      t.append(time.perf_counter())
      x = rh.box_head(rh.box_roi_pool(feats, proposals, sizes))
      class_logits, box_regression = rh.box_predictor(x)
      boxes, _, labels = rh.postprocess_detections(class_logits, box_regression, proposals, sizes)
      t.append(time.perf_counter())
      mask_logits = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, boxes, sizes)))
      maskrcnn_inference(mask_logits, labels)
      t.append(time.perf_counter())
      return np.diff(t)

    staged()  # warm-up
    runs = np.array([staged() for _ in range(repeats)])
    result["stages"] = {name: [1e3 * float(np.median(runs[:, i])), None] for i, name in enumerate(STAGES)}
  return result


def _worker_jax(data_dir: pathlib.Path, kind: str, batch: int, repeats: int, stages: bool) -> dict:
  """mrcnn_jax with the shipped config: the jitted `build_infer` on the batch as the Predictor prepares it (resized,
  normalized and padded to the smallest canvas of the config that holds the images)."""
  from mrcnn_jax import config_files
  from mrcnn_jax.convert import torchvision as tv_convert
  from mrcnn_jax.data import transforms
  from mrcnn_jax.modeling import mask_rcnn
  from mrcnn_jax.modeling.box_head import detect
  from mrcnn_jax.modeling.mask_head import select_class_masks

  config = config_files.load_config(str(MODEL_CONFIGS[kind]))
  if kind == "keypoint":
    config.model.roi_heads.score_thresh_test = 0.0  # 100 detections, as torchvision's side
  state_dict = tv_convert.load_state_dict_file(data_dir / f"{kind}_state_dict.npz")
  variables = jax.device_put(tv_convert.convert_state_dict(state_dict))
  del state_dict
  prepared = [transforms.preprocess(x, config.input) for x in np.load(data_dir / "images.npy")[:batch]]
  images = jnp.asarray(np.stack([c for c, _ in prepared]))
  info = jnp.asarray(np.stack([i for _, i in prepared]))

  infer = mask_rcnn.build_infer(config)
  ms, compile_s = time_jax(infer, (variables, images, info), repeats)
  out = jax.device_get(infer(variables, images, info))
  result = {"ms": ms, "compile_s": compile_s, "peak_rss_gb": _peak_rss_gb(),
            "detections": [int(v.sum()) for v in out["valid"]], "canvas_hw": list(images.shape[1:3])}
  # Boxes in the resized image's pixels, as torchvision's roi_heads returns them.
  np.savez(data_dir / "boxes_jax.npz", *[b[v] for b, v in zip(out["boxes"], out["valid"])])
  if stages and kind == "mask":
    model = mask_rcnn.build_model(config)
    cfg = config.model
    canvas_hw = tuple(images.shape[1:3])

    # The pieces of MaskRCNN.infer, each run through model.apply on its own (the library is not changed).
    def features(module, images, info):
      return module.features(images, module.frames(info))

    def proposals(module, feats, info):
      boxes, _, valid = module.proposals(feats, info[:, :2], canvas_hw, module.frames(info))
      return boxes, valid

    def box_head(module, feats, boxes, valid, info):
      logits, deltas = module.box_head(module.pool(feats, boxes, cfg.pooler.box_resolution, module.frames(info)))
      rh = cfg.roi_heads
      return detect(logits, deltas, boxes, valid, info[:, :2], score_thresh=rh.score_thresh_test,
                    nms_thresh=rh.nms_thresh_test, detections_per_image=rh.detections_per_image,
                    min_box_size=rh.min_box_size_test, box_weights=tuple(rh.box_weights))

    def mask_head(module, feats, boxes, classes, info):
      pooled = module.pool(feats, boxes, cfg.pooler.mask_resolution, module.frames(info))
      return select_class_masks(module.mask_head(pooled), classes)

    # Each stage is timed (compile first) before it is called for the next stage's inputs: a call before
    # lower().compile() would leave the executable in JAX's cache and hide the compile time.
    result["stages"] = {}

    def run(name, fn, *args):
      jitted = jax.jit(lambda v, *a: model.apply(v, *a, method=fn))
      result["stages"][name] = list(time_jax(jitted, (variables,) + args, repeats))
      return jitted(variables, *args)

    feats = run(STAGES[0], features, images, info)
    boxes, valid = run(STAGES[1], proposals, feats, info)
    det = run(STAGES[2], box_head, feats, boxes, valid, info)
    run(STAGES[3], mask_head, feats, det["boxes"], det["classes"], info)
  return result


def _matched(data_dir: pathlib.Path) -> tuple[int, int]:
  """(our detections whose box has IoU > 0.99 with one of torchvision's, our detections), over the batch."""
  hits = total = 0
  with np.load(data_dir / "boxes_jax.npz") as ours, np.load(data_dir / "boxes_torch.npz") as tv:
    for key in ours.files:
      a, b = ours[key], tv[key]
      total += len(a)
      if not len(a) or not len(b):
        continue
      lt = np.maximum(a[:, None, :2], b[None, :, :2])
      rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
      inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
      area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
      iou = inter / (area(a)[:, None] + area(b)[None, :] - inter)
      hits += int((iou.max(1) > 0.99).sum())
  return hits, total


def run_model_worker(args) -> dict:
  if args.group == "train":
    worker = _train_worker_jax if args.only == "jax" else _train_worker_torch
    return worker(args.batch, args.repeats, args.dtype) if args.only == "jax" else worker(args.batch, args.repeats)
  worker = _worker_jax if args.only == "jax" else _worker_torch
  return worker(args.data, args.kind, args.batch, args.repeats, args.stages)


def run_model(args) -> list[Row]:
  """Each model, image size and batch: torchvision's side and ours in their own subprocesses (peak RSS)."""
  rows = []
  for kind in args.models:
    for image_name in args.images:
      image_hw = MODEL_IMAGES[image_name]
      for batch in args.batches:
        with tempfile.TemporaryDirectory(prefix="mrcnn_jax_benchmark_") as tmp:
          data_dir = pathlib.Path(tmp)
          _prepare_model_data(data_dir, kind, image_hw, batch)
          res = {}
          for side in ("torch", "jax"):
            cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "model", "--only", side, "--data", tmp,
                   "--kind", kind, "--batch", str(batch), "--repeats", str(args.repeats), "--host_malloc",
                   args.host_malloc]
            cmd += ["--stages"] if batch == 1 else []
            start, load = time.perf_counter(), os.getloadavg()[0]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, cwd=REPO)
            res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            # Other processes on the machine skew the figures: the load average says whether they were there.
            print(f"{kind} {image_name} batch {batch}, {side}: {time.perf_counter() - start:.0f} s, 1-min load "
                  f"average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", file=sys.stderr,
                  flush=True)
          hits, total = _matched(data_dir)
        j, t = res["jax"], res["torch"]
        canvas = "x".join(map(str, j["canvas_hw"]))
        padded = "x".join(map(str, t["padded_hw"]))
        note = (f"canvas {canvas} (torchvision pads to {padded}); peak RSS jax {j['peak_rss_gb']:.1f} GB / torch "
                f"{t['peak_rss_gb']:.1f} GB; detections jax {'+'.join(map(str, j['detections']))} / torch "
                f"{'+'.join(map(str, t['detections']))}, {hits}/{total} matched at IoU>0.99")
        name = {"mask": "mask_rcnn", "keypoint": "keypoint_rcnn"}[kind]
        rows.append(Row(f"{name} R50-FPN {image_name} batch {batch}", j["ms"], t["ms"], j["compile_s"], note))
        if "stages" in j:
          total_j = sum(v[0] for v in j["stages"].values())
          total_t = sum(v[0] for v in t["stages"].values())
          for stage in STAGES:
            (ms, cs), t_ms = j["stages"][stage], t["stages"][stage][0]
            rows.append(Row(f"  {image_name} batch {batch} stage: {stage}", ms, t_ms, cs,
                            f"{100 * ms / total_j:.0f}% of our stage sum / {100 * t_ms / total_t:.0f}% of torch's"))
  return rows


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------


def _bench_loader(name, source, input_cfg, batch_size, num_batches, num_workers) -> list[Row]:
  """Batches per second of the training loader, and the per-image cost of its steps (decode, resize, mask crop)."""
  from mrcnn_jax.data import pipeline, transforms

  loader = pipeline.make_train_loader(source, input_cfg, global_batch_size=batch_size, seed=0,
                                      num_workers=num_workers, shard_options=_single_shard())
  it = iter(loader)
  next(it)  # the workers start (and import their modules) here
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  seconds = time.perf_counter() - start
  del it
  per_batch_ms = 1e3 * seconds / num_batches
  rows = [Row(f"data {name}: loader batch {batch_size}, {num_workers} workers", per_batch_ms, None, 0.0,
              f"{num_batches / seconds:.2f} batches/s = {batch_size * num_batches / seconds:.1f} images/s")]
  # Per-image steps, in this process, over a few records.
  records = source.records[:8]
  images = [source.load_image(r) for r in records]
  rng = np.random.default_rng(0)
  decode = _median_ms(lambda: [source.load_image(r) for r in records], 5) / len(records)
  h, w = images[0].shape[:2]
  size = transforms.output_size(h, w, max(input_cfg.min_size_train), input_cfg.max_size_train,
                                input_cfg.resize_mode)
  resize = _median_ms(lambda: [transforms.resize_image(im, size, input_cfg.resize_mode) for im in images], 5)
  resize /= len(images)
  example = _median_ms(lambda: [pipeline.train_example(r, im, input_cfg, rng) for r, im in zip(records, images)], 5)
  example /= len(records)
  n = sum(r.num_instances for r in records) / len(records)
  rows.append(Row(f"data {name}: per image decode / resize / whole train_example", example, None, 0.0,
                  f"decode {decode:.1f} ms, resize {resize:.1f} ms, train_example {example:.1f} ms "
                  f"(resize, flip, normalize, pad, {n:.1f} mask crops)"))
  return rows


def _single_shard():
  import grain.python as grain

  return grain.ShardOptions(shard_index=0, shard_count=1, drop_remainder=True)


def run_data(args) -> list[Row]:
  from mrcnn_jax import config_files
  from mrcnn_jax.data import coco, shapes

  config = config_files.load_config(str(REPO / "configs" / "mask_rcnn_R50_FPN_1x.py"))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    # COCO-like: 640x480 images resized to the COCO training sizes on the 1344x1344 canvas.
    paths = shapes.write_dataset(pathlib.Path(tmp) / "coco_like", 48, 0, seed=0, size_hw=(480, 640))
    source = coco.load_coco(paths["train_annotations"], paths["train_images"], train=True)
    rows += _bench_loader("640x480 -> 800x1333 (canvas 1344)", source, config.input, 2, 20, 2)
    # The shapes set at its own size.
    paths = shapes.write_dataset(pathlib.Path(tmp) / "shapes", 256, 0, seed=0)
    source = coco.load_coco(paths["train_annotations"], paths["train_images"], train=True)
    small = config.input
    small.min_size_train, small.max_size_train, small.canvases = (128,), 128, ((128, 128),)
    rows += _bench_loader("shapes 128x128", source, small, 8, 30, 2)
  return rows


# ------------------------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------------------------

TRAIN_HW = (512, 512)


def _train_inputs(batch: int):
  """Images in [0, 1] (B, 3, H, W) and per image 3 boxes with full-image masks (ellipses), labels in 1..90."""
  rng = np.random.default_rng(0)
  h, w = TRAIN_HW
  yy, xx = np.mgrid[:h, :w]
  images, targets = [], []
  for _ in range(batch):
    masks, boxes = [], []
    for _ in range(3):
      # At 512x512: centres in [100, 400), radii in [30, 90); scaled with the canvas for other sizes.
      sy, sx = h / 512, w / 512
      cy, cx = rng.uniform(100, 400) * sy, rng.uniform(100, 400) * sx
      ry, rx = rng.uniform(30, 90) * sy, rng.uniform(30, 90) * sx
      m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
      ys, xs = np.nonzero(m)
      masks.append(m.astype(np.uint8))
      boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    images.append(rng.random((3, h, w), np.float32))
    targets.append((np.array(boxes, np.float32), rng.integers(1, 91, 3), np.stack(masks)))
  return images, targets


def _train_worker_torch(batch: int, repeats: int) -> dict:
  import torch
  import torchvision

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                             min_size=TRAIN_HW[0], max_size=TRAIN_HW[1])
  model.train()
  for m in model.modules():  # frozen BatchNorm, as mrcnn_jax's FrozenBN
    if isinstance(m, torch.nn.BatchNorm2d):
      m.eval()
  # torchvision's recipe (a pretrained backbone, trainable_backbone_layers=3) trains layer2..layer4 only, as our
  # config's freeze_at=2 does; without weights_backbone it would train the stem and layer1 too, so freeze them here.
  for name, p in model.backbone.body.named_parameters():
    if not name.startswith(("layer2.", "layer3.", "layer4.")):
      p.requires_grad_(False)
  opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9,
                        weight_decay=1e-4)
  images, targets = _train_inputs(batch)
  images = [torch.tensor(x) for x in images]
  targets = [{"boxes": torch.tensor(b), "labels": torch.tensor(l), "masks": torch.tensor(m)} for b, l, m in targets]

  def step():
    opt.zero_grad()
    losses = model(images, targets)
    sum(losses.values()).backward()
    opt.step()

  ms = time_torch(step, repeats)
  return {"ms": ms, "compile_s": 0.0, "peak_rss_gb": _peak_rss_gb()}


def _train_worker_jax(batch: int, repeats: int, dtype: str = "float32") -> dict:
  from mrcnn_jax import config_files, train
  from mrcnn_jax.data import pipeline
  from mrcnn_jax.modeling import mask_rcnn
  from mrcnn_jax.ops import masks as mask_ops

  config = config_files.load_config(str(REPO / "configs" / "torchvision_maskrcnn_r50_fpn.py"))
  config.input.canvases = (TRAIN_HW,)
  config.model.compute_dtype = dtype
  config.train.warmup_iters = 0
  config.train.base_lr = 0.001
  images, targets = _train_inputs(batch)
  mean = np.asarray(config.input.pixel_mean, np.float32)
  std = np.asarray(config.input.pixel_std, np.float32)
  g = config.input.max_instances
  b = {"image": np.stack([(x.transpose(1, 2, 0) - mean) / std for x in images]),
       "image_info": np.tile(np.array([*TRAIN_HW, 1, 1, *TRAIN_HW], np.float32), (batch, 1)),
       "gt_boxes": np.zeros((batch, g, 4), np.float32), "gt_classes": np.zeros((batch, g), np.int32),
       "gt_valid": np.zeros((batch, g), bool), "gt_is_crowd": np.zeros((batch, g), bool),
       "gt_masks": np.zeros((batch, g, config.input.gt_mask_size, config.input.gt_mask_size), np.uint8)}
  for i, (boxes, labels, masks) in enumerate(targets):
    n = len(boxes)
    b["gt_boxes"][i, :n], b["gt_classes"][i, :n], b["gt_valid"][i, :n] = boxes, labels, True
    b["gt_masks"][i, :n] = mask_ops.crop_masks_to_boxes(masks, boxes, config.input.gt_mask_size)
  mesh = train.make_mesh()
  state = jax.device_put(train.create_train_state(config, jax.random.key(0), TRAIN_HW),
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  step = train.jit_train_step(config, mask_rcnn.build_model(config, train=True), mesh)
  gb = pipeline.to_global_batch(b, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, gb).compile()
  compile_s = time.perf_counter() - start
  holder = [jax.block_until_ready(compiled(state, gb)[0])]

  def run():
    holder[0] = jax.block_until_ready(compiled(holder[0], gb)[0])

  ms = _median_ms(run, repeats)
  return {"ms": ms, "compile_s": compile_s, "peak_rss_gb": _peak_rss_gb()}


def run_train(args) -> list[Row]:
  """One R50-FPN train step per batch size, each side in its own process. Both sample 512 RoIs per image; the mask
  head runs on torchvision's positives only (3 per image here, the ground truth) and on our smallest foreground
  bucket that holds them (8 slots per image, `model.roi_heads.foreground_buckets`). With --skip_torch (e.g. on a
  GPU machine whose torch has no CUDA) only our side runs; the note gives images/s."""
  rows = []
  hw = ["--train_hw", str(TRAIN_HW[0]), str(TRAIN_HW[1])]
  for batch in args.batches:
    res = {"torch": None}
    for side in ("jax",) if args.skip_torch else ("torch", "jax"):
      cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "train", "--only", side, "--batch", str(batch),
             "--repeats", str(args.repeats), "--dtype", args.dtype, "--host_malloc", args.host_malloc, *hw]
      proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, cwd=REPO)
      res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    j, t = res["jax"], res["torch"]
    note = (f"{batch / (j['ms'] / 1000):.2f} images/s ({args.dtype}); peak RSS jax {j['peak_rss_gb']:.1f} GB" +
            ("" if t is None else f" / torch {t['peak_rss_gb']:.1f} GB") +
            "; 512 sampled RoIs/image; mask heads on the positives (ours: their smallest foreground bucket)")
    rows.append(Row(f"train step R50-FPN batch {batch} {TRAIN_HW[0]}x{TRAIN_HW[1]}", j["ms"],
                    None if t is None else t["ms"], j["compile_s"], note))
  return rows


GROUPS = {"ops": run_ops, "model": run_model, "data": run_data, "train": run_train}
DEFAULT_REPEATS = {"ops": 7, "model": 5, "data": 5, "train": 5}


def print_table(rows: list[Row]) -> None:
  width = max(len(r.name) for r in rows)
  print(f"{'benchmark':<{width}}  {'mrcnn_jax ms':>12}  {'torchvision ms':>14}  {'ratio':>6}  {'compile s':>9}  note")
  for r in rows:
    torch_ms = "-" if r.torch_ms is None else f"{r.torch_ms:14.1f}"
    ratio = "-" if r.ratio is None else f"{r.ratio:6.2f}"
    print(f"{r.name:<{width}}  {r.jax_ms:12.1f}  {torch_ms:>14}  {ratio:>6}  {r.compile_s:9.2f}  {r.note}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("group", nargs="?", default="ops", choices=sorted(GROUPS))
  parser.add_argument("--repeats", type=int, help="warm runs per figure (median); at least 5 (default: ops 7, "
                      "model 5)")
  parser.add_argument("--impl", default="xla", choices=["xla", "pallas"], help="RoIAlign implementation to time")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="model, train: batch sizes to time")
  parser.add_argument("--models", nargs="+", default=["mask", "keypoint"], choices=sorted(MODEL_CONFIGS),
                      help="model: which models (Mask R-CNN, Keypoint R-CNN)")
  parser.add_argument("--images", nargs="+", default=list(MODEL_IMAGES), choices=list(MODEL_IMAGES),
                      help="model: image sizes (W x H)")
  parser.add_argument("--train_hw", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                      help="train: the padded canvas of the step, e.g. 800 1344")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="train: our model's compute dtype (bfloat16 on GPU/TPU; params stay float32)")
  parser.add_argument("--skip_torch", action="store_true", help="train: time only mrcnn_jax (no torchvision run)")
  parser.add_argument("--host_malloc", default="reuse", choices=host_memory.CHOICES,
                      help="model, train: host allocator setting of both sides' processes (see above)")
  parser.add_argument("--json", type=pathlib.Path, help="also write the rows here (atomically)")
  # The model group's workers (one subprocess per side and batch): print their result as JSON on the last line.
  parser.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--data", type=pathlib.Path, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--kind", choices=sorted(MODEL_CONFIGS), help=argparse.SUPPRESS)
  parser.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  global TRAIN_HW
  TRAIN_HW = tuple(args.train_hw)
  if args.repeats is None:
    args.repeats = DEFAULT_REPEATS[args.group]
  if args.repeats < 5:
    parser.error("--repeats must be at least 5")
  if args.only:
    # Before torch or JAX starts a thread: the setting must hold for every thread's allocations.
    host_memory.configure(args.host_malloc)
    if args.only == "jax":
      _import_jax()
    print(json.dumps(run_model_worker(args)))
    return 0
  _import_jax()
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
  rows = GROUPS[args.group](args)
  print_table(rows)
  if args.json:
    atomic.write_json(args.json, {"group": args.group, "backend": jax.default_backend(),
                                  "rows": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows]}, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
