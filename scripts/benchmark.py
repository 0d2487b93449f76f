#!/usr/bin/env python
"""mrcnn_jax beside torchvision, in one run on one machine: each figure is the median of warm runs, compile apart.

Usage:
  python scripts/benchmark.py ops [--repeats 7] [--impl xla|pallas] [--json results.json]
  python scripts/benchmark.py model [--repeats 5] [--batches 1 2] [--json results.json]
  python scripts/benchmark.py data
  python scripts/benchmark.py train --batches 2
  python scripts/benchmark.py device [--tiny] [--budget_s 450] [--json device.json]

Groups (one module each in scripts/bench/):
  ops    RoIAlign (features 1x200x336x256, 1,000 boxes, 7x7, sampling_ratio 2, aligned False/True, forward and
         forward+backward), NMS on 4,000 boxes, paste of 100 28x28 masks into 800x1333.
         On a GPU it also times the Pallas RoIAlign kernel against the XLA path.
  model  R50-FPN Mask R-CNN and Keypoint R-CNN inference, each side on its own defaults, on a 640x480 image (COCO's
         most common size; torchvision resizes it to 800x1066 and pads to 800x1088) and an 800x1333 one, batch 1 and
         2: torchvision's maskrcnn_resnet50_fpn / keypointrcnn_resnet50_fpn (score threshold 0 for the keypoint
         model) with random weights spread so that they return 100 detections per image (the mask and keypoint
         heads work on all of them), converted with convert_state_dict and run with the shipped
         configs/mask_rcnn_R50_FPN_torchvision.py / keypoint_rcnn_R50_FPN_torchvision.py (score threshold 0 for the
         keypoints too), on the canvas each picks (noted per row). Timed on both sides: the model on the padded
         batch, without transform and postprocess (torchvision: backbone + rpn + roi_heads, keypoint decoding
         included; mrcnn_jax: the jitted `build_infer`, NHWC). Each side runs in its own subprocess, so that its peak
         RSS (in the note) is its own; after both are set up they take turns, one timed run each per round, the
         first alternating, so that the machine's drift falls on both sides alike. At batch 1 it also times Mask
         R-CNN's stages apart (each jitted alone on our side): backbone+FPN, RPN head + proposals, box head +
         detection, mask head (RoIAlign 14x14 included).
         Default --repeats here is 5; --models, --images and --batches narrow the run.
  data   The training loader (grain, 2 workers): batches/s on COCO-like input (synthetic 640x480 images resized to
         800x1333 on the 1344x1344 canvas, batch 2) and on the shapes set (128x128, batch 8), and the per-image cost
         of decode, resize and the whole train_example (resize, flip, normalize, pad, mask crops). No torch side.
  train  One training step of R50-FPN Mask R-CNN at 512x512 (torchvision conventions, random init, FrozenBN and
         stem + res2 frozen on both sides, 3 instances per image, 512 sampled RoIs per image): torchvision's
         forward + backward + SGD step vs mrcnn_jax's jitted `train_step` (compile apart); each side in its own
         subprocess (peak RSS). --train_hw 800 1344 times the COCO-sized canvas.
  device The accelerator check, mrcnn_jax alone, within --budget_s (default 450 s: under 8 minutes on one GPU):
         environment and versions; the Pallas RoIAlign against the XLA path on the device (errors, and both timed at
         1,000 and 8,000 RoIs, 7x7 and 14x14, 256 channels, on the 4 FPN levels and on one 1x200x336x256 map);
         R50-FPN Mask R-CNN inference images/s at batch 1 and 8 in float32 and bfloat16 on the 800x1088 canvas of a
         640x480 image; the bfloat16 train step's images/s at batch 8 beside its target (>= 60 per H100-class GPU);
         every program's compile time and the device's peak memory. Each part in its own time-boxed subprocess;
         what does not fit is skipped with a note. Its own table and JSON (scripts/bench/device.py has the schema).
         --tiny runs the same code paths at toy sizes on a CPU (2 minutes here; tests/test_benchmark_device.py).

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
import importlib
import json
import os
import pathlib
import sys

# The package imports no JAX on import, nor do the group modules: the torch workers stay free of it.
from mrcnn_jax import atomic, host_memory

from bench.common import Row
from bench.model import MODEL_CONFIGS, MODEL_IMAGES

GROUPS = ("ops", "model", "data", "train", "device")
DEFAULT_REPEATS = {"ops": 7, "model": 5, "data": 5, "train": 5, "device": 10}


def _group(name: str):
  """The group's module, imported when it runs (ops and data import JAX at their top)."""
  return importlib.import_module(f"bench.{name}")


def print_table(rows: list[Row]) -> None:
  width = max(len(r.name) for r in rows)
  print(f"{'benchmark':<{width}}  {'mrcnn_jax ms':>12}  {'torchvision ms':>14}  {'ratio':>6}  {'compile s':>9}  note")
  for r in rows:
    torch_ms = "-" if r.torch_ms is None else f"{r.torch_ms:14.1f}"
    ratio = "-" if r.ratio is None else f"{r.ratio:6.2f}"
    print(f"{r.name:<{width}}  {r.jax_ms:12.1f}  {torch_ms:>14}  {ratio:>6}  {r.compile_s:9.2f}  {r.note}")


def _run_device(args) -> int:
  """The device group: no JAX in this process (it would hold the accelerator its parts' subprocesses need)."""
  device = _group("device")
  if args.part:
    return importlib.import_module("bench.device_parts").worker(args)
  report = device.run(args)
  device.print_report(report)
  if args.json:
    atomic.write_json(args.json, report, indent=2)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("group", nargs="?", default="ops", choices=sorted(GROUPS))
  parser.add_argument("--repeats", type=int, help="warm runs per figure (median); at least 5 (default: ops 7, "
                      "model 5, device 10)")
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
  parser.add_argument("--tiny", action="store_true", help="device: toy sizes, the Pallas kernel interpreted (CPU)")
  parser.add_argument("--budget_s", type=float, help="device: seconds for all parts (default 450; --tiny 300)")
  parser.add_argument("--pallas_impl", choices=["pallas", "pallas_interpret_gpu", "pallas_interpret_tpu"],
                      help="device: the Pallas form to check (default: pallas on GPU/TPU, with --tiny "
                      "pallas_interpret_gpu, else none)")
  parser.add_argument("--json", type=pathlib.Path, help="also write the rows here (atomically)")
  # The model and train groups' workers (one subprocess per side and batch): print their result as JSON on the last
  # line.
  parser.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--data", type=pathlib.Path, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--kind", choices=sorted(MODEL_CONFIGS), help=argparse.SUPPRESS)
  parser.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
  # The device group's parts (one subprocess each): results as JSON lines in --results, no items after --deadline.
  parser.add_argument("--part", choices=["roi_align", "infer", "train"], help=argparse.SUPPRESS)
  parser.add_argument("--results", type=pathlib.Path, help=argparse.SUPPRESS)
  parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.repeats is None:
    args.repeats = 5 if args.tiny else DEFAULT_REPEATS[args.group]
  if args.repeats < 5:
    parser.error("--repeats must be at least 5")
  if args.budget_s is None:
    args.budget_s = 300.0 if args.tiny else 450.0
  if args.only or args.part:
    # Before torch or JAX starts a thread: the setting must hold for every thread's allocations.
    host_memory.configure(args.host_malloc)
  if args.group == "device":
    return _run_device(args)
  if args.only:
    print(json.dumps(_group(args.group).worker(args)))
    return 0
  import jax

  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
  rows = _group(args.group).run(args)
  print_table(rows)
  if args.json:
    atomic.write_json(args.json, {"group": args.group, "backend": jax.default_backend(),
                                  "rows": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows]}, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
