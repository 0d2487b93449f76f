"""The ops group: RoIAlign, NMS and the mask paste, mrcnn_jax's jitted ops against torchvision's.

  python scripts/benchmark.py ops [--repeats 7] [--impl xla|pallas] [--json results.json]

RoIAlign on features 1x200x336x256 with 1,000 boxes, 7x7, sampling_ratio 2, aligned False/True, forward and
forward+backward; NMS on 4,000 RPN-like boxes at three settings; the paste of 100 28x28 masks into 800x1333. On a GPU
or TPU `--impl pallas` also times the Pallas RoIAlign kernel beside the XLA path. One process (torch with as many
threads as cores).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import Row, time_jax, time_torch


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


def run(args) -> list[Row]:
  import torch
  import torchvision

  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  rows = bench_roi_align(rng, args.repeats, args.impl, torch, torchvision)
  rows += bench_nms(rng, args.repeats, torch, torchvision)
  rows += bench_paste(rng, args.repeats, torch, torchvision)
  return rows
