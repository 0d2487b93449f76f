"""The device group's parts (scripts/bench/device.py says what each measures), each run in its own subprocess:
`benchmark.py device --part roi_align|infer|train --results FILE --deadline T` appends one JSON line per row, skip
or error to FILE as it goes, so that a part killed at the end of its time box keeps what it had done.

A part is a setup (inputs, weights) and its items (`device.plan`), smallest first. An item that raises (a kernel
that does not lower, a program over the device's memory) is reported as an error and the next one runs; an item is
not started when the part's box has less time left than the item should take (`ESTIMATE_S`, raised to what the
part's previous item took). JAX is imported inside the functions: the parent process never holds the device.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import numpy as np

from bench.common import REPO, median_ms
from bench.device import CONFIG, ESTIMATE_S, SCALES, TINY_OVERRIDES, TRAIN_TARGET, hw_name, plan, versions


def _peak_bytes():
  """The device's peak bytes in use so far in this process, None where the backend keeps no statistics (CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _program_bytes(compiled):
  """XLA's estimate of a compiled program's own peak memory, None where the backend gives none."""
  try:
    return int(compiled.memory_analysis().peak_memory_in_bytes)
  except (AttributeError, TypeError, NotImplementedError):
    return None


def _compile_and_time(jitted, args, repeats):
  """(warm-up output, median ms, compile s, the program's own peak bytes or None) of a jitted function."""
  import jax

  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  out = jax.block_until_ready(compiled(*args))
  ms = median_ms(lambda: jax.block_until_ready(compiled(*args)), repeats)
  return out, ms, compile_s, _program_bytes(compiled)


def _errors(got, want) -> tuple[float, float]:
  """(max abs error, that over max |want|) of two pytrees of arrays, reduced on the device (an 8,000-RoI 14x14
  output is 1.6 GB: only the two numbers come back)."""
  import jax
  import jax.numpy as jnp

  pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) for g, w in pairs)
  scale = max(float(jnp.max(jnp.abs(w.astype(jnp.float32)))) for _, w in pairs)
  return err, err / scale if scale else err


def _random_boxes(rng, n, image_hw, box_px):
  """n XYXY boxes inside image_hw, sides log-uniform in box_px, so that they spread over the FPN levels."""
  h, w = image_hw
  side = np.exp(rng.uniform(np.log(box_px[0]), np.log(box_px[1]), (n, 2)))
  wh = np.minimum(side * np.exp(rng.uniform(-0.5, 0.5, (n, 2))), [w, h])
  xy = rng.uniform(0, 1, (n, 2)) * ([w, h] - wh)
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------------
# roi_align: the Pallas kernel against the XLA path, both timed.
# ------------------------------------------------------------------------------------------------------------------


def _roi_align_setup(args) -> dict:
  """The feature maps of both layouts (P2..P5 of the canvas, and P2 alone), drawn on the device."""
  import jax

  s = SCALES[args.tiny]
  (h, w), c = s["canvas"], s["channels"]
  key = jax.random.key(0)
  strides = {"fpn": (4, 8, 16, 32), "single": (4,)}
  feats = {layout: [jax.random.normal(jax.random.fold_in(key, i), (1, h // st, w // st, c)) for i, st in enumerate(sts)]
           for layout, sts in strides.items()}
  return {"feats": feats, "key": key, "pallas_failed": None}


def _roi_align_item(item, ctx, args, emit) -> None:
  import jax
  import jax.numpy as jnp

  from mrcnn_jax.ops import roi_align as ra

  s = SCALES[args.tiny]
  layout, n, res = item["layout"], item["rois"], item["output"]
  levels = ctx["feats"][layout]
  boxes = jnp.asarray(_random_boxes(np.random.default_rng(n + res), n, s["canvas"], s["box_px"])[None])
  cot = jax.random.normal(jax.random.fold_in(ctx["key"], 100 + n + res), (1, n, res, res, s["channels"]))

  # torchvision's settings (the shipped torchvision configs): sampling_ratio 2, aligned=False, its level mapper.
  def pool(fs, bx, impl):
    if layout == "single":
      return ra.roi_align(fs[0], bx, res, 0.25, 2, False, impl=impl)
    return ra.multilevel_roi_align(fs, bx, res, 2, False, 2, 224, 4, level_convention="torchvision", impl=impl)

  def fwd_bwd(fs, bx, g, impl):
    out, vjp = jax.vjp(lambda f: pool(f, bx, impl), fs)
    return out, vjp(g)[0]

  if args.pallas_impl is None:
    emit({"kind": "skipped", "part": "roi_align", "item": f"{item['name']} [pallas]", "reason": "no Pallas kernel "
          "on this backend; its interpreter takes many minutes at this scale (--tiny, or --pallas_impl to insist)"})
  reference = None  # XLA's (output, features' gradient), which the Pallas row is checked against
  for impl in ("xla", args.pallas_impl) if args.pallas_impl else ("xla",):
    row = {"item": item["name"], "name": f"{item['name']} [{impl}]", "layout": layout,
           "features": [list(f.shape) for f in levels], "rois": n, "output": res, "impl": impl}
    if impl != "xla" and (ctx["pallas_failed"] or reference is None):
      reason = (f"the Pallas kernel failed on {ctx['pallas_failed']} (see its error)" if ctx["pallas_failed"] else
                "no XLA result to check it against (see the XLA row's error)")
      emit({"kind": "skipped", "part": "roi_align", "item": row["name"], "reason": reason})
      continue
    try:
      out, row["forward_ms"], row["forward_compile_s"], _ = _compile_and_time(
          jax.jit(lambda fs, bx, impl=impl: pool(fs, bx, impl)), (levels, boxes), args.repeats)
      (_, grad), row["fwd_bwd_ms"], row["fwd_bwd_compile_s"], row["program_peak_bytes"] = _compile_and_time(
          jax.jit(lambda fs, bx, g, impl=impl: fwd_bwd(fs, bx, g, impl)), (levels, boxes, cot), args.repeats)
    except Exception as e:  # reported; the next implementation or item still runs
      if impl != "xla":
        ctx["pallas_failed"] = item["name"]
      emit({"kind": "error", "part": "roi_align", "item": row["name"], "error": _error_text(e)})
      traceback.print_exc()
      continue
    if impl == "xla":
      reference = out, grad
    else:
      row["forward_max_abs_err"], row["forward_rel_err"] = _errors(out, reference[0])
      row["backward_max_abs_err"], row["backward_rel_err"] = _errors(grad, reference[1])
    row["peak_bytes_in_use"] = _peak_bytes()
    emit({"kind": "roi_align", **row})


# ------------------------------------------------------------------------------------------------------------------
# infer and train: the shipped torchvision Mask R-CNN config, random weights.
# ------------------------------------------------------------------------------------------------------------------


def _model_config(tiny: bool, dtype: str):
  """The shipped torchvision Mask R-CNN config in `dtype` (--tiny: shrunk), every image keeping its
  detections_per_image detections (score threshold 0: the mask head's work of a busy image)."""
  from mrcnn_jax import config_files

  config = config_files.load_config(str(REPO / CONFIG))
  config.model.compute_dtype = dtype
  config.model.roi_heads.score_thresh_test = 0.0
  for key, value in (TINY_OVERRIDES if tiny else {}).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _model_name(tiny: bool) -> str:
  return "R18/4-FPN (tiny)" if tiny else "R50-FPN"


def _infer_setup(args) -> dict:
  """Random images of the part's image size, and one set of weights on the device (float32 in either dtype)."""
  import jax

  from mrcnn_jax.modeling import mask_rcnn

  s = SCALES[args.tiny]
  images = np.random.default_rng(0).random((max(s["batches"]),) + s["image"] + (3,), np.float32)
  variables = mask_rcnn.random_variables(_model_config(args.tiny, "float32"))
  return {"images": images, "variables": jax.device_put(variables)}


def _infer_item(item, ctx, args, emit) -> None:
  import jax.numpy as jnp

  from mrcnn_jax.data import transforms
  from mrcnn_jax.modeling import mask_rcnn

  s, b = SCALES[args.tiny], item["batch"]
  config = _model_config(args.tiny, item["dtype"])
  prepared = [transforms.preprocess(x, config.input) for x in ctx["images"][:b]]  # resized, normalized, padded
  images = jnp.asarray(np.stack([p for p, _ in prepared]))
  info = jnp.asarray(np.stack([i for _, i in prepared]))
  out, ms, compile_s, program = _compile_and_time(mask_rcnn.build_infer(config), (ctx["variables"], images, info),
                                                  args.repeats)
  resized, canvas = [int(v) for v in info[0, :2]], list(images.shape[1:3])
  name = (f"mask_rcnn {_model_name(args.tiny)} {hw_name(s['image'])} -> {hw_name(resized)} on canvas "
          f"{hw_name(canvas)} batch {b} {item['dtype']}")
  emit({"kind": "infer", "item": item["name"], "name": name, "config": CONFIG, "image_hw": list(s["image"]),
        "resized_hw": resized, "canvas_hw": canvas, "batch": b, "dtype": item["dtype"], "ms": ms,
        "images_per_s": 1e3 * b / ms, "compile_s": compile_s,
        "detections_per_image": [int(v) for v in np.asarray(out["valid"]).sum(axis=1)],
        "program_peak_bytes": program, "peak_bytes_in_use": _peak_bytes()})


def _train_batch(config, batch: int, image_hw, instances: int, rng) -> dict:
  """A training batch (`pipeline.train_example`'s arrays) of `batch` images of size image_hw as the training
  transform lays them out: normalized noise inside the resized image, zeros outside, `instances` boxes with an
  ellipse mask each (the M x M crop of its box), labels in 1..K."""
  from mrcnn_jax.data import transforms

  inp = config.input
  h, w = transforms.output_size(*image_hw, max(inp.min_size_train), inp.max_size_train, inp.resize_mode)
  canvas = transforms.choose_canvas((h, w), transforms.canvases(inp))
  g, m = inp.max_instances, inp.gt_mask_size
  yy, xx = (np.mgrid[:m, :m] + 0.5) / m - 0.5
  ellipse = (255 * (yy**2 + xx**2 <= 0.25)).astype(np.uint8)
  info = np.array([h, w, h / image_hw[0], w / image_hw[1], *image_hw], np.float32)
  out = {"image": np.zeros((batch, *canvas, 3), np.float32), "image_info": np.tile(info, (batch, 1)),
         "gt_boxes": np.zeros((batch, g, 4), np.float32), "gt_classes": np.zeros((batch, g), np.int32),
         "gt_valid": np.zeros((batch, g), bool), "gt_is_crowd": np.zeros((batch, g), bool),
         "gt_masks": np.zeros((batch, g, m, m), np.uint8)}
  for i in range(batch):
    out["image"][i, :h, :w] = rng.standard_normal((h, w, 3), np.float32)
    out["gt_boxes"][i, :instances] = _random_boxes(rng, instances, (h, w), (min(h, w) / 25, min(h, w) / 2))
    out["gt_classes"][i, :instances] = rng.integers(1, config.model.num_classes + 1, instances)
    out["gt_valid"][i, :instances] = True
    out["gt_masks"][i, :instances] = ellipse
  return out


def _train_item(item, ctx, args, emit) -> None:
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from mrcnn_jax import mesh as mesh_lib
  from mrcnn_jax import train, train_state
  from mrcnn_jax.data import pipeline
  from mrcnn_jax.modeling import mask_rcnn

  s, b = SCALES[args.tiny], item["batch"]
  config = _model_config(args.tiny, item["dtype"])
  mesh = mesh_lib.make_mesh(jax.devices()[:1])  # one chip: the figure is per device
  state = train_state.state_from_variables(config, mask_rcnn.random_variables(config))
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  batch = pipeline.to_global_batch(_train_batch(config, b, s["image"], s["instances"], np.random.default_rng(0)), mesh)
  step = train.jit_train_step(config, mask_rcnn.build_model(config, train=True), mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = list(jax.block_until_ready(compiled(state, batch)))  # the state is donated: each step takes the last one

  def run():
    holder[:] = jax.block_until_ready(compiled(holder[0], batch))

  ms = median_ms(run, args.repeats)
  metrics = jax.device_get(holder[1])
  canvas = list(batch["image"].shape[1:3])
  ips = 1e3 * b / ms
  name = (f"train step mask_rcnn {_model_name(args.tiny)} {hw_name(s['image'])} on canvas {hw_name(canvas)} "
          f"batch {b} {item['dtype']}")
  emit({"kind": "train", "item": item["name"], "name": name, "config": CONFIG, "image_hw": list(s["image"]),
        "canvas_hw": canvas, "batch": b, "dtype": item["dtype"], "instances_per_image": s["instances"], "ms": ms,
        "images_per_s": ips, "compile_s": compile_s, "target_images_per_s": TRAIN_TARGET,
        "meets_target": None if args.tiny else ips >= TRAIN_TARGET,  # the target is R50-FPN's on a GPU
        "total_loss": float(metrics["total_loss"]), "finite": bool(metrics["finite"]),
        "program_peak_bytes": _program_bytes(compiled), "peak_bytes_in_use": _peak_bytes()})


# ------------------------------------------------------------------------------------------------------------------
# The worker.
# ------------------------------------------------------------------------------------------------------------------

PARTS = {"roi_align": (_roi_align_setup, _roi_align_item), "infer": (_infer_setup, _infer_item),
         "train": (lambda args: {}, _train_item)}


def _error_text(e: BaseException) -> str:
  return "".join(traceback.format_exception_only(type(e), e)).strip()[:2000]


def environment() -> dict:
  import jax

  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": d.device_kind, "device_count": jax.device_count(),
          "platform_version": str(getattr(d.client, "platform_version", "")), **versions()}


def worker(args) -> int:
  """One part (`--part`): appends one JSON line per row, skip or error to --results. Exit status 1 when the part's
  setup failed (none of its items ran)."""
  import jax

  if args.pallas_impl is None and (jax.default_backend() in ("gpu", "tpu") or args.tiny):
    # No Pallas kernel for CPU: there --tiny interprets the Triton one (at full scale that takes many minutes).
    args.pallas_impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "pallas_interpret_gpu"
  with open(args.results, "a") as results:

    def emit(record):
      results.write(json.dumps(record) + "\n")
      results.flush()  # line by line: a part killed at the end of its box keeps what it had done

    emit({"kind": "environment", **environment()})
    setup, run_item = PARTS[args.part]
    try:
      ctx = setup(args)
    except Exception as e:
      emit({"kind": "error", "part": args.part, "item": f"{args.part} (the part's setup)", "error": _error_text(e)})
      traceback.print_exc()
      return 1
    estimate = ESTIMATE_S[args.tiny][args.part]
    for item in plan(args.tiny)[args.part]:
      left = args.deadline - time.time()
      print(f"device {args.part}: {item['name']} ({left:.0f} s left in the part's box)", file=sys.stderr, flush=True)
      if left < estimate:
        emit({"kind": "skipped", "part": args.part, "item": item["name"],
              "reason": f"{left:.0f} s left in the part's box, the item takes about {estimate:.0f} s"})
        continue
      start = time.time()
      try:
        run_item(item, ctx, args, emit)
      except Exception as e:  # reported; the next item still runs
        emit({"kind": "error", "part": args.part, "item": item["name"], "error": _error_text(e)})
        traceback.print_exc()
      estimate = max(estimate, time.time() - start)
  return 0
