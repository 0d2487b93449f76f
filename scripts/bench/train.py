"""The train group: one R50-FPN Mask R-CNN training step, mrcnn_jax's jitted `train_step` against torchvision's.

  python scripts/benchmark.py train [--batches 2] [--train_hw 512 512] [--dtype float32|bfloat16] [--skip_torch]

torchvision conventions on both sides (random init, FrozenBN, stem + res2 frozen, 3 instances per image, 512
sampled RoIs per image); torchvision's forward + backward + SGD step against our step (compile apart). Each side
runs in its own subprocess (`worker`; peak RSS), and the torch worker never imports JAX (hence the imports inside
`_train_worker_jax`). --train_hw sets TRAIN_HW, the canvas of the step, in the parent and in each worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from bench.common import REPO, SCRIPT, Row, median_ms, peak_rss_gb, time_torch

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
  return {"ms": ms, "compile_s": 0.0, "peak_rss_gb": peak_rss_gb()}


def _train_worker_jax(batch: int, repeats: int, dtype: str = "float32") -> dict:
  import jax

  from mrcnn_jax import config_files, train
  from mrcnn_jax.data import pipeline
  from mrcnn_jax.modeling import mask_rcnn
  from mrcnn_jax.ops import masks as mask_ops

  config = config_files.load_config(str(REPO / "configs" / "mask_rcnn_R50_FPN_torchvision.py"))
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

  ms = median_ms(run, repeats)
  return {"ms": ms, "compile_s": compile_s, "peak_rss_gb": peak_rss_gb()}


def run(args) -> list[Row]:
  """One R50-FPN train step per batch size, each side in its own process. Both sample 512 RoIs per image; the mask
  head runs on torchvision's positives only (3 per image here, the ground truth) and on our smallest foreground
  bucket that holds them (8 slots per image, `model.roi_heads.foreground_buckets`). With --skip_torch (e.g. on a
  GPU machine whose torch has no CUDA) only our side runs; the note gives images/s."""
  _set_canvas(args)
  rows = []
  hw = ["--train_hw", str(TRAIN_HW[0]), str(TRAIN_HW[1])]
  for batch in args.batches:
    res = {"torch": None}
    for side in ("jax",) if args.skip_torch else ("torch", "jax"):
      cmd = [sys.executable, str(SCRIPT), "train", "--only", side, "--batch", str(batch),
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


def _set_canvas(args) -> None:
  global TRAIN_HW
  TRAIN_HW = tuple(args.train_hw)


def worker(args) -> dict:
  """One side of one row, in its subprocess (`--only jax|torch`): the dict the parent reads as JSON."""
  _set_canvas(args)
  if args.only == "jax":
    return _train_worker_jax(args.batch, args.repeats, args.dtype)
  return _train_worker_torch(args.batch, args.repeats)
