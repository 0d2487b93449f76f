#!/usr/bin/env python
"""mrcnn_jax beside torchvision, in one run on one machine: each figure is the median of warm runs, compile apart.

Usage:
  python scripts/benchmark.py ops [--repeats 7] [--impl xla|pallas] [--json results.json]
  python scripts/benchmark.py model [--repeats 5] [--batches 1 2] [--json results.json]

Groups (more arrive with the data and trainer):
  ops    RoIAlign (features 1x200x336x256, 1,000 boxes, 7x7, sampling_ratio 2, aligned False/True, forward and
         forward+backward), NMS on 4,000 boxes, paste of 100 28x28 masks into 800x1333.
         On a GPU it also times the Pallas RoIAlign kernel against the XLA path.
  model  R50-FPN Mask R-CNN inference on 800x1333 images (batch 1 and 2; torchvision's transform pads them to
         800x1344): torchvision's maskrcnn_resnet50_fpn with random weights spread so that it returns 100
         detections per image (the mask head works on all of them), converted with convert_state_dict and run as
         configs/torchvision_maskrcnn_r50_fpn.py. Timed on both sides: the model on the padded batch, without
         transform and postprocess (torchvision: backbone + rpn + roi_heads on the ImageList; mrcnn_jax: the jitted
         `build_infer` on the same tensor, NHWC). Each side runs in its own subprocess, so that its peak RSS (in the
         note) is its own. At batch 1 it also times the stages apart (each jitted alone on our side): backbone+FPN,
         RPN head + proposals, box head + detection, mask head (RoIAlign 14x14 included).
         Default --repeats here is 5.

torch runs with as many threads as JAX's CPU client uses (all cores). The ratio column is mrcnn_jax / torchvision:
below 1.0 means mrcnn_jax is faster. torch and torchvision are needed here (the `parity` extra); the library itself
never imports them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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
# main
# ------------------------------------------------------------------------------------------------------------------

GROUPS = {"ops": run_ops}


def print_table(rows: list[Row]) -> None:
  width = max(len(r.name) for r in rows)
  print(f"{'benchmark':<{width}}  {'mrcnn_jax ms':>12}  {'torchvision ms':>14}  {'ratio':>6}  {'compile s':>9}  note")
  for r in rows:
    torch_ms = "-" if r.torch_ms is None else f"{r.torch_ms:14.1f}"
    ratio = "-" if r.ratio is None else f"{r.ratio:6.2f}"
    print(f"{r.name:<{width}}  {r.jax_ms:12.1f}  {torch_ms:>14}  {ratio:>6}  {r.compile_s:9.2f}  {r.note}")


def write_json_atomically(path: pathlib.Path, payload) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
    json.dump(payload, f, indent=2)
  os.replace(f.name, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("group", nargs="?", default="ops", choices=sorted(GROUPS))
  parser.add_argument("--repeats", type=int, default=7, help="warm runs per figure (median); at least 5")
  parser.add_argument("--impl", default="xla", choices=["xla", "pallas"], help="RoIAlign implementation to time")
  parser.add_argument("--json", type=pathlib.Path, help="also write the rows here (atomically)")
  args = parser.parse_args(argv)
  if args.repeats < 5:
    parser.error("--repeats must be at least 5")
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
  rows = GROUPS[args.group](args)
  print_table(rows)
  if args.json:
    write_json_atomically(args.json, {"group": args.group, "backend": jax.default_backend(),
                                      "rows": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows]})
  return 0


if __name__ == "__main__":
  sys.exit(main())
