"""The model group: R50-FPN Mask R-CNN and Keypoint R-CNN inference, mrcnn_jax against torchvision.

  python scripts/benchmark.py model [--repeats 5] [--models mask keypoint] [--images 640x480 1333x800]
      [--batches 1 2] [--json results.json]

Each side on its own defaults (see benchmark.py's docstring for what is timed): torchvision's model with random
weights spread so that it returns 100 detections per image, converted for mrcnn_jax's shipped torchvision configs.
Each model, image size and batch runs each side in its own subprocess (`worker`), so that its peak RSS is its own;
the torch worker never imports JAX (hence the imports inside `_worker_jax`). The two workers load, compile and warm
up one after the other, then take turns (`_serve`): the parent asks each in turn for one timed run, alternating
which goes first, so that the machine's drift over minutes falls on both sides alike rather than on one.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import REPO, SCRIPT, Row, compile_warm, peak_rss_gb, time_jax


# The shipped torchvision configs, unchanged (loaded by path, as the entry points load them), against torchvision's
# models at their defaults (min_size 800, max_size 1333).
MODEL_CONFIGS = {"mask": REPO / "configs" / "mask_rcnn_R50_FPN_torchvision.py",
                 "keypoint": REPO / "configs" / "keypoint_rcnn_R50_FPN_torchvision.py"}
# Image sizes (H, W): COCO's most common 640x480, and a full-size 800x1333.
MODEL_IMAGES = {"640x480": (480, 640), "1333x800": (800, 1333)}
STAGES = ("backbone+FPN", "RPN head + proposals", "box head + detect", "mask head")
# The workers' protocol lines on stdout start with this (anything else a library prints there is skipped).
PROTOCOL = "BENCH"
# Seconds between one side's run and the other's: the threads of the side that just ran stop spinning first.
SETTLE_S = 0.5


def _serve(run_once) -> None:
  """A worker's timed runs, on the parent's word: says `ready`, then times one `run_once()` for each `run` line on
  stdin and says its ms, until `finish`."""
  print(PROTOCOL, "ready", flush=True)
  for line in sys.stdin:
    command = line.strip()
    if command == "finish":
      return
    if command != "run":
      raise ValueError(f"benchmark worker: unknown command {command!r} (run or finish)")
    start = time.perf_counter()
    run_once()
    print(PROTOCOL, "ms", 1e3 * (time.perf_counter() - start), flush=True)
  raise RuntimeError("benchmark worker: stdin closed before finish")


def _read_protocol(proc, what: str) -> list[str]:
  """The next protocol line from a worker, split; other lines are passed to stderr."""
  for line in proc.stdout:
    if line.startswith(PROTOCOL + " "):
      return line.split()[1:]
    sys.stderr.write(line)
  raise RuntimeError(f"benchmark worker exited (status {proc.wait()}) while the parent waited for {what}")



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

  forward()  # warm-up
  _serve(forward)
  detections = forward()
  result = {"peak_rss_gb": peak_rss_gb(), "detections": [len(d["boxes"]) for d in detections],
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
  """mrcnn_jax with the shipped config: the jitted `build_infer` with the compiler options the Predictor compiles it
  with (`cpu.compiler.inference_options`), on the batch as the Predictor prepares it (resized, normalized and
  padded to the smallest canvas of the config that holds the images)."""
  import jax
  import jax.numpy as jnp

  from mrcnn_jax import config_files
  from mrcnn_jax.convert import torchvision as tv_convert
  from mrcnn_jax.cpu import compiler as cpu_compiler
  from mrcnn_jax.data import transforms
  from mrcnn_jax.modeling import mask_rcnn
  from mrcnn_jax.modeling.box_head import detect

  config = config_files.load_config(str(MODEL_CONFIGS[kind]))
  if kind == "keypoint":
    config.model.roi_heads.score_thresh_test = 0.0  # 100 detections, as torchvision's side
  state_dict = tv_convert.load_state_dict_file(data_dir / f"{kind}_state_dict.npz")
  variables = jax.device_put(tv_convert.convert_state_dict(state_dict))
  del state_dict
  prepared = [transforms.preprocess(x, config.input) for x in np.load(data_dir / "images.npy")[:batch]]
  images = jnp.asarray(np.stack([c for c, _ in prepared]))
  info = jnp.asarray(np.stack([i for _, i in prepared]))

  options = cpu_compiler.inference_options()
  infer = mask_rcnn.build_infer(config, compiler_options=options)
  run, compile_s = compile_warm(infer, (variables, images, info))
  _serve(run)
  out = jax.device_get(run())
  result = {"compile_s": compile_s, "peak_rss_gb": peak_rss_gb(),
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
      return jax.nn.sigmoid(module.mask_head(pooled, classes))

    # Each stage is timed (compile first) before it is called for the next stage's inputs: a call before
    # lower().compile() would leave the executable in JAX's cache and hide the compile time.
    result["stages"] = {}

    def run(name, fn, *args):
      jitted = jax.jit(lambda v, *a: model.apply(v, *a, method=fn), compiler_options=options)
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


def worker(args) -> dict:
  """One side of one row, in its subprocess (`--only jax|torch`): the dict the parent reads as JSON."""
  side = _worker_jax if args.only == "jax" else _worker_torch
  return side(args.data, args.kind, args.batch, args.repeats, args.stages)


def _run_interleaved(commands: dict[str, list[str]], repeats: int) -> dict:
  """Both sides of one row, each worker a subprocess (`commands`: side -> command line, in set-up order): each set
  up in turn, then `repeats` rounds of one timed run each, the first side alternating, then each worker's finish
  (its result, and its stages at batch 1) in turn. {side: the worker's result, with runs_ms and their median ms}."""
  procs, res = {}, {}
  try:
    for side, cmd in commands.items():
      procs[side] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
      _read_protocol(procs[side], f"{side}'s set-up")
    sides = list(procs)
    runs = {side: [] for side in sides}
    for r in range(repeats):
      for side in (sides if r % 2 == 0 else sides[::-1]):
        time.sleep(SETTLE_S)
        procs[side].stdin.write("run\n")
        procs[side].stdin.flush()
        runs[side].append(float(_read_protocol(procs[side], f"{side}'s run")[1]))
    for side in sides:
      out, _ = procs[side].communicate("finish\n")
      if procs[side].returncode:
        raise RuntimeError(f"benchmark worker {side} failed with status {procs[side].returncode}")
      res[side] = json.loads(out.strip().splitlines()[-1])
      res[side].update(runs_ms=[round(t, 1) for t in runs[side]], ms=float(np.median(runs[side])))
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
  return res


def run(args) -> list[Row]:
  """Each model, image size and batch: torchvision's side and ours in their own subprocesses (peak RSS), timed in
  turns (`_run_interleaved`)."""
  rows = []
  for kind in args.models:
    for image_name in args.images:
      image_hw = MODEL_IMAGES[image_name]
      for batch in args.batches:
        with tempfile.TemporaryDirectory(prefix="mrcnn_jax_benchmark_") as tmp:
          data_dir = pathlib.Path(tmp)
          _prepare_model_data(data_dir, kind, image_hw, batch)
          start, load = time.perf_counter(), os.getloadavg()[0]
          commands = {side: [sys.executable, str(SCRIPT), "model", "--only", side, "--data", tmp, "--kind", kind,
                              "--batch", str(batch), "--repeats", str(args.repeats), "--host_malloc",
                              args.host_malloc] + (["--stages"] if batch == 1 else [])
                       for side in ("torch", "jax")}
          res = _run_interleaved(commands, args.repeats)
          # Other processes on the machine skew the figures: the load average says whether they were there.
          print(f"{kind} {image_name} batch {batch}: {time.perf_counter() - start:.0f} s, 1-min load average "
                f"{load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; runs ms torch "
                f"{res['torch']['runs_ms']}, jax {res['jax']['runs_ms']}", file=sys.stderr, flush=True)
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

