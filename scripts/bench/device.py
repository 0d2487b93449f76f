"""The device group: the check to run on an accelerator, one command within a time budget (8 minutes on one GPU).

  python scripts/benchmark.py device [--json device.json] [--budget_s 450] [--repeats 10] [--pallas_impl IMPL]
  python scripts/benchmark.py device --tiny [--json device.json]   # the same code paths on a CPU (2 minutes here)

It runs on the first device only (one chip) and measures:
  environment  backend, device kind and count, jax / jaxlib / flax versions.
  roi_align    RoIAlign (torchvision's settings: sampling_ratio 2, aligned=False, 256 channels) through the Pallas
               kernel (`impl="pallas"`) and through the XLA path on the device: the Pallas outputs and features'
               gradient against XLA's (max abs error, and relative: over max |XLA|), and both timed, forward and
               forward + backward, at R50-FPN scale: 1,000 and 8,000 RoIs, 7x7 and 14x14 outputs, on the 4 FPN
               levels of an 800x1344 canvas (P2..P5, `multilevel_roi_align`) and on one 1x200x336x256 map.
  infer        R50-FPN Mask R-CNN inference (the jitted `build_infer`) with the shipped
               configs/mask_rcnn_R50_FPN_torchvision.py on a 640x480 image, which goes to 800x1066 on the 800x1088
               canvas: images/s at batch 1 and 8, float32 and bfloat16 (`model.compute_dtype`; float32 runs with
               XLA's default precision, TF32 on NVIDIA GPUs). Random weights, score threshold 0, so that every image
               gives the full 100 detections (the work of a trained model's busiest images).
  train        the jitted train step (`train.jit_train_step`, one device) of the same config at batch 8 in bfloat16
               on that canvas, 7 instances per image: images/s beside the target (>= 60 per H100-class GPU).
For every program: its compile time (lower + compile, apart from the runs), the median of --repeats warm runs, the
program's own peak (XLA's memory analysis) and the device's `memory_stats()["peak_bytes_in_use"]` ("n/a" where the
backend has none, as on CPU). Each part runs in its own subprocess, so that the device's peak is that part's (its
items run smallest first, so each item's peak so far is its own) and a part that fails or overruns stops alone.

Budget: the parts share --budget_s (default 450 s, under 8 minutes with the processes' start-up): roi_align 25%,
infer 40%, train 35%, what a part leaves unused going to the next. A part is killed at the end of its box; before each
item it checks the time left and skips the item, with a note, when the item would not fit (an estimate, raised to
what the part's previous item took). An item that fails (a kernel that does not lower, a program over the memory) is
reported with its error and the next one runs. Whatever is skipped or failed is listed in the table and the JSON.

--tiny: ResNet-18 at a quarter width on a 64x64 canvas (a 48x36 image; one foreground bucket), RoIAlign with 4 and
12 RoIs of 32 channels on the maps of a 96x64 canvas, the Pallas kernel in the interpreter (`pallas_interpret_gpu`
unless --pallas_impl says otherwise; `pallas_interpret_tpu` simulates every DMA and takes seconds per RoI), one item
per code path (fpn 7x7 and single-map 14x14; inference at batch 1 in bfloat16 and batch 2 in float32; the bfloat16
train step at batch 8), and the same parts, processes and JSON; tests/test_benchmark_device.py runs it. Without
--tiny on a CPU the Pallas rows are skipped with a note: there is no CPU kernel, and the interpreter takes many
minutes at R50-FPN scale (--pallas_impl pallas_interpret_gpu insists).

JSON (--json, written atomically): {"group": "device", "tiny", "backend", "budget_s", "wall_s", "environment":
{backend, device_kind, device_count, platform_version, jax, jaxlib, flax, python}, "pallas_impl",
"pallas_tolerance", "pallas_ok" (every Pallas error within the tolerance; null when none was measured), "roi_align":
[{item, name, layout, features (shapes), rois, output, impl, forward_ms, forward_compile_s, fwd_bwd_ms,
fwd_bwd_compile_s, program_peak_bytes (of forward + backward), peak_bytes_in_use, and on the Pallas rows
forward_max_abs_err, forward_rel_err, backward_max_abs_err, backward_rel_err}], "infer": [{item, name, config,
image_hw, resized_hw, canvas_hw, batch, dtype, ms, images_per_s, compile_s, detections_per_image, program_peak_bytes,
peak_bytes_in_use}], "train": [{item, name, config, image_hw, canvas_hw, batch, dtype, instances_per_image, ms,
images_per_s, compile_s, target_images_per_s, meets_target (null with --tiny), total_loss, finite,
program_peak_bytes, peak_bytes_in_use}], "skipped": [{part, item, reason}], "errors": [{part, item, error}],
"parts": {part: {box_s, wall_s, status}}, "rows": [{part, name, ms, images_per_s, compile_s, peak_memory, note}]}.
Byte counts are ints, or null where the backend has no figure; the table prints GiB or "n/a".
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

from bench.common import REPO, SCRIPT

PARTS = ("roi_align", "infer", "train")
SHARES = {"roi_align": 0.25, "infer": 0.40, "train": 0.35}
TRAIN_TARGET = 60.0  # images/s per H100-class GPU: R50-FPN Mask R-CNN, batch 8, bfloat16
# Both paths accumulate the same float32 products in the same order; what is left is FMA contraction and rounding.
PALLAS_TOLERANCE = 1e-5
CONFIG = "configs/mask_rcnn_R50_FPN_torchvision.py"
# Each item's expected seconds (compile included) for the skip decision; a part's previous item raises it.
ESTIMATE_S = {False: {"roi_align": 10, "infer": 60, "train": 120}, True: {"roi_align": 2, "infer": 8, "train": 25}}
# Scale of each mode: RoIAlign canvas, channels, RoI counts and box sides; the image of the model parts (H, W).
SCALES = {
    False: {"canvas": (800, 1344), "channels": 256, "rois": (1000, 8000), "box_px": (16, 600), "image": (480, 640),
            "instances": 7, "batches": (1, 8)},
    True: {"canvas": (64, 96), "channels": 32, "rois": (4, 12), "box_px": (4, 48), "image": (36, 48),
           "instances": 3, "batches": (1, 2)},
}
# --tiny's model: the shipped config shrunk to ResNet-18 at a quarter width on a 64x64 canvas (as tests/tiny_model.py).
TINY_OVERRIDES = {
    "model.backbone.depth": 18, "model.backbone.width": 16, "model.fpn.channels": 32,
    "model.rpn.pre_nms_topk_test": 50, "model.rpn.post_nms_topk_test": 20, "model.rpn.pre_nms_topk_train": 50,
    "model.rpn.post_nms_topk_train": 20, "model.rpn.batch_size_per_image": 32, "model.roi_heads.fc_dim": 32,
    "model.roi_heads.detections_per_image": 10, "model.roi_heads.batch_size_per_image": 16,
    "model.mask_head.conv_dim": 16, "input.canvases": ((64, 64),), "input.min_size_test": 48,
    "input.max_size_test": 64, "input.min_size_train": (48,), "input.max_size_train": 64, "input.max_instances": 8,
    "input.gt_mask_size": 16,
    # The mask head's training switch has one branch per bucket, each compiled: one branch keeps --tiny quick.
    "model.roi_heads.foreground_buckets": (),
}


def plan(tiny: bool) -> dict[str, list[dict]]:
  """Every part's items in the order they run (smallest first), each with its `name`. --tiny keeps one item per code
  path (each layout and output size, each dtype, the train step), since every item is a few compiles."""
  s = SCALES[tiny]
  roi = [{"name": f"{layout} {n} RoIs {res}x{res}", "layout": layout, "rois": n, "output": res}
         for n in s["rois"] for res in (7, 14) for layout in ("fpn", "single")]
  infer = [{"name": f"batch {b} {d}", "batch": b, "dtype": d} for b in s["batches"] for d in ("bfloat16", "float32")]
  if tiny:
    roi = [roi[0], roi[-1]]  # fpn, fewest RoIs, 7x7; one map, most RoIs, 14x14
    infer = [infer[0], infer[-1]]  # batch 1 bfloat16, batch 2 float32
  return {"roi_align": roi, "infer": infer, "train": [{"name": "batch 8 bfloat16", "batch": 8, "dtype": "bfloat16"}]}


def versions() -> dict:
  """jax, jaxlib and flax's installed versions and python's, read without importing JAX."""
  out = {}
  for name in ("jax", "jaxlib", "flax"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out | {"python": platform.python_version()}


def hw_name(hw) -> str:
  """(H, W) as torchvision and COCO name image sizes: W x H."""
  return f"{hw[1]}x{hw[0]}"


# ------------------------------------------------------------------------------------------------------------------
# The parent: the parts one after the other, each in its time box; the table and the JSON.
# ------------------------------------------------------------------------------------------------------------------

MIN_BOX_S = 20.0  # below this a part is not started: its process would not get past its start-up on a GPU


def _run_part(part: str, box_s: float, args, results: pathlib.Path) -> tuple[str, float]:
  """Runs one part's subprocess for at most box_s seconds. Returns (status, wall s)."""
  start = time.time()
  # The worker stops starting items a little before the hard stop, so that it can finish the one it is in.
  cmd = [sys.executable, str(SCRIPT), "device", "--part", part, "--results", str(results),
         "--deadline", str(start + 0.9 * box_s), "--repeats", str(args.repeats), "--host_malloc", args.host_malloc]
  cmd += ["--tiny"] if args.tiny else []
  cmd += ["--pallas_impl", args.pallas_impl] if args.pallas_impl else []
  try:
    proc = subprocess.run(cmd, cwd=REPO, timeout=box_s, stdout=subprocess.DEVNULL)
    status = "ok" if proc.returncode == 0 else f"its process exited with status {proc.returncode}"
  except subprocess.TimeoutExpired:
    status = f"stopped at the end of its time box ({box_s:.0f} s)"
  return status, time.time() - start


def run(args) -> dict:
  """All parts within args.budget_s: the report that `print_report` prints and --json writes."""
  start = time.time()
  deadline = start + args.budget_s
  report = {"group": "device", "tiny": bool(args.tiny), "budget_s": args.budget_s, "environment": versions(),
            "pallas_impl": args.pallas_impl, "pallas_tolerance": PALLAS_TOLERANCE, "roi_align": [], "infer": [],
            "train": [], "skipped": [], "errors": [], "parts": {}}
  items = plan(args.tiny)
  with tempfile.TemporaryDirectory(prefix="mrcnn_jax_device_") as tmp:
    for i, part in enumerate(PARTS):
      reserve = sum(SHARES[p] for p in PARTS[i + 1:]) * args.budget_s  # the later parts' shares stay theirs
      box_s = deadline - time.time() - reserve
      results = pathlib.Path(tmp) / f"{part}.jsonl"
      if box_s < (1.0 if args.tiny else MIN_BOX_S):
        status, wall_s = f"not started: {max(box_s, 0):.0f} s left in the budget", 0.0
      else:
        print(f"device {part}: time box {box_s:.0f} s", file=sys.stderr, flush=True)
        status, wall_s = _run_part(part, box_s, args, results)
      report["parts"][part] = {"box_s": round(max(box_s, 0.0), 1), "wall_s": round(wall_s, 1), "status": status}
      records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
      for record in records:
        kind = record.pop("kind")
        if kind == "environment":
          report["environment"] = record
        elif kind in ("skipped", "errors", "error"):
          report["skipped" if kind == "skipped" else "errors"].append(record)
        else:
          report[kind].append(record)
      # An item is accounted for when a row, skip or error names it (RoIAlign's are per implementation: "ITEM [impl]").
      done = {r["item"] for r in report[part] + report["skipped"] + report["errors"]}
      for item in items[part]:
        if not any(name == item["name"] or name.startswith(item["name"] + " [") for name in done):
          report["skipped"].append({"part": part, "item": item["name"], "reason": f"not run ({status})"})
  pallas = [r for r in report["roi_align"] if r["impl"] != "xla"]
  report["backend"] = report["environment"].get("backend")
  report["pallas_impl"] = pallas[0]["impl"] if pallas else args.pallas_impl
  failed = [e for e in report["errors"] if e["part"] == "roi_align" and not e["item"].endswith("[xla]")]
  within = [max(r["forward_rel_err"], r["backward_rel_err"]) <= PALLAS_TOLERANCE for r in pallas]
  report["pallas_ok"] = False if failed else (all(within) if within else None)  # a kernel that fails is not ok
  report["wall_s"] = round(time.time() - start, 1)
  report["rows"] = _rows(report)
  return report


def _memory(row) -> str:
  peak = row.get("peak_bytes_in_use")
  return "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"


def _program(row) -> str:
  peak = row.get("program_peak_bytes")
  return "" if peak is None else f"; program peak {peak / 2**20:.0f} MiB (XLA's estimate)"


def _rows(report) -> list[dict]:
  """The table's rows: every figure, then whatever was skipped or failed."""
  rows = []
  for r in report["roi_align"]:
    note = "sampling 2, aligned=False"
    if r["impl"] != "xla":
      note = (f"vs xla: forward max abs err {r['forward_max_abs_err']:.2e} (rel {r['forward_rel_err']:.2e}), "
              f"features' grad {r['backward_max_abs_err']:.2e} (rel {r['backward_rel_err']:.2e})")
    for what, ms, cs in (("forward", r["forward_ms"], r["forward_compile_s"]),
                         ("fwd+bwd", r["fwd_bwd_ms"], r["fwd_bwd_compile_s"])):
      rows.append({"part": "roi_align", "name": f"{r['name']} {what}", "ms": ms, "images_per_s": None,
                   "compile_s": cs, "peak_memory": _memory(r), "note": note if what == "forward" else ""})
  for r in report["infer"]:
    dets = sorted(set(r["detections_per_image"]))
    rows.append({"part": "infer", "name": r["name"], "ms": r["ms"], "images_per_s": r["images_per_s"],
                 "compile_s": r["compile_s"], "peak_memory": _memory(r),
                 "note": f"{'/'.join(map(str, dets))} detections per image{_program(r)}"})
  for r in report["train"]:
    verdict = {True: "met", False: "not met", None: "not for --tiny"}[r["meets_target"]]
    rows.append({"part": "train", "name": r["name"], "ms": r["ms"], "images_per_s": r["images_per_s"],
                 "compile_s": r["compile_s"], "peak_memory": _memory(r),
                 "note": f"target >= {r['target_images_per_s']:.0f} images/s per H100-class GPU: {verdict}; "
                         f"total loss {r['total_loss']:.3f}{_program(r)}"})
  for r in report["skipped"]:
    rows.append({"part": r["part"], "name": r["item"], "ms": None, "images_per_s": None, "compile_s": None,
                 "peak_memory": "", "note": f"skipped: {r['reason']}"})
  for r in report["errors"]:
    rows.append({"part": r["part"], "name": r["item"], "ms": None, "images_per_s": None, "compile_s": None,
                 "peak_memory": "", "note": f"error: {r['error'].splitlines()[-1][:300]}"})
  return rows


def print_report(report) -> None:
  env = report["environment"]
  tiny = " (--tiny)" if report["tiny"] else ""
  print(f"device check{tiny}: {env.get('backend', '?')} ({env.get('device_kind', '?')}, "
        f"{env.get('device_count', '?')} device(s), {env.get('platform_version', '')}); jax {env.get('jax')}, "
        f"jaxlib {env.get('jaxlib')}, flax {env.get('flax')}, python {env.get('python')}")
  ok = {None: "not measured", True: "within", False: "NOT within"}[report["pallas_ok"]]
  print(f"Pallas RoIAlign ({report['pallas_impl']}) vs XLA: {ok} {report['pallas_tolerance']:g} relative; budget "
        f"{report['budget_s']:.0f} s, took {report['wall_s']:.0f} s; " +
        ", ".join(f"{p} {v['wall_s']:.0f}/{v['box_s']:.0f} s {v['status']}" for p, v in report["parts"].items()))
  rows = report["rows"]
  width = max([len(r["name"]) for r in rows] + [9])
  print(f"{'part':<9}  {'benchmark':<{width}}  {'ms':>9}  {'images/s':>8}  {'compile s':>9}  {'peak mem':>9}  note")
  for r in rows:
    ms = "-" if r["ms"] is None else f"{r['ms']:9.2f}"
    ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:8.1f}"
    cs = "-" if r["compile_s"] is None else f"{r['compile_s']:9.2f}"
    print(f"{r['part']:<9}  {r['name']:<{width}}  {ms:>9}  {ips:>8}  {cs:>9}  {r['peak_memory']:>9}  {r['note']}")
