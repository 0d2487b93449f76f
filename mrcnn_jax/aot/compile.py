"""Compiling the programs for a `Target` and reading the result: memory per device against the chip's HBM, XLA's FLOPs
against the hand count, the slow-op census (`compile_program`); the largest batch per chip that fits
(`search_max_batch`); and `run`, everything the command does, over each program and canvas of a config."""

from __future__ import annotations

import math
import re
import time

import jax

from mrcnn_jax.aot.flops import hand_flops
from mrcnn_jax.aot.hlo import slow_ops
from mrcnn_jax.aot.programs import PROGRAMS, canvases, lower_infer, lower_train_step
from mrcnn_jax.aot.topology import Target, format_gib, libtpu_version


class DoesNotFit(RuntimeError):
  """A program needs more memory per device than the chip's HBM."""

  def __init__(self, message: str, *, program: str, batch_per_chip: int, total_bytes: float | None):
    super().__init__(message)
    self.program = program
    self.batch_per_chip = batch_per_chip
    self.total_bytes = total_bytes


# --------------------------------------------------------------------------------------------------------------------
# One compile.
# --------------------------------------------------------------------------------------------------------------------


def memory_report(compiled) -> dict:
  """Bytes per device of a compiled program; total = arguments + outputs - aliased + temporaries + generated code
  (a donated argument that an output reuses is counted once)."""
  m = compiled.memory_analysis()
  out = {
      "arguments": int(m.argument_size_in_bytes),
      "outputs": int(m.output_size_in_bytes),
      "aliased": int(m.alias_size_in_bytes),
      "temporaries": int(m.temp_size_in_bytes),
      "generated_code": int(m.generated_code_size_in_bytes),
  }
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["generated_code"]
  host = sum(int(getattr(m, f"host_{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp"))
  if host:
    out["host"] = host
  return out


def _oom_message(error: Exception) -> str | None:
  """The first line of an XLA compile error that says the program does not fit, else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
    return None
  for line in text.splitlines():
    if "memory" in line.lower():
      return re.sub(r"\s+", " ", line).strip()[:300]
  return text.strip().splitlines()[0][:300]


def _oom_used_bytes(message: str) -> float | None:
  """The bytes an XLA:TPU out-of-memory message says the program needs ("Used 49.34G of 32.00G hbm", "Requires
  3.84T, has 90.96G", "required for HLO temporaries (16.44G) exceeds available HBM (15.75G)"), else None."""
  m = (re.search(r"Used ([\d.]+)([KMGT])? of", message) or re.search(r"Requires ([\d.]+)([KMGT])?", message)
       or re.search(r"\(([\d.]+)([KMGT])?\) exceeds", message))
  if not m:
    return None
  return float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_")


def _compile(lowered, where: str, target: Target, program: str, batch_per_chip: int):
  """`lowered.compile()`, XLA's refusal for lack of memory raised as DoesNotFit (one line, with the bytes XLA says
  the program needs when it says)."""
  try:
    return lowered.compile()
  except Exception as e:  # XLA:TPU refuses a program over the HBM at compile time
    message = _oom_message(e)
    if message is None:
      raise
    used = _oom_used_bytes(message)
    raise DoesNotFit(f"{where} does not fit in {target.hbm_description}: XLA: {message}",
                     program=program, batch_per_chip=batch_per_chip, total_bytes=used) from None


def _flops_report(compiled, config, canvas_hw, program: str, batch_per_chip: int) -> dict:
  """XLA's FLOP estimate of one step per device and per image, beside the hand count of one image."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan")))
  hand = hand_flops(config, canvas_hw, train=program == "train")
  return {
      "xla_per_device": xla_flops,
      "xla_per_image": xla_flops / batch_per_chip,
      "hand_per_image": hand["total"],
      "hand_per_image_by_part": {k: v for k, v in hand.items() if k != "total"},
      "xla_over_hand": xla_flops / batch_per_chip / hand["total"],
  }


def compile_program(config, target: Target, program: str, canvas_hw, batch_per_chip: int, *,
                    check_fit: bool = True) -> dict:
  """Lower and compile one program for `target`; returns its report (memory, FLOPs, slow ops, timings).

  Raises DoesNotFit when XLA refuses it for lack of memory or when its total exceeds the chip's HBM (unless
  check_fit is False, which reports fits=False instead).
  """
  if program not in PROGRAMS:
    raise ValueError(f"unknown program {program!r}; expected one of {PROGRAMS}")
  if batch_per_chip < 1:
    raise ValueError(f"batch_per_chip must be >= 1, got {batch_per_chip}")
  global_batch = batch_per_chip * target.num_devices
  lower = lower_train_step if program == "train" else lower_infer
  where = (f"the {'train step' if program == 'train' else 'inference program'} at {batch_per_chip} images per chip "
           f"({canvas_hw[0]}x{canvas_hw[1]}, {config.model.compute_dtype})")
  t0 = time.perf_counter()
  lowered = lower(config, target.mesh, canvas_hw, global_batch)
  t1 = time.perf_counter()
  compiled = _compile(lowered, where, target, program, batch_per_chip)
  t2 = time.perf_counter()
  memory = memory_report(compiled)
  fits = memory["total"] <= target.hbm
  if check_fit and not fits:
    raise DoesNotFit(f"{where} does not fit in {target.hbm_description}: it needs "
                     f"{format_gib(memory['total'])} per device", program=program, batch_per_chip=batch_per_chip,
                     total_bytes=memory["total"])
  report = {
      "program": program,
      "canvas_hw": list(canvas_hw),
      "batch_per_chip": batch_per_chip,
      "global_batch": global_batch,
      "compute_dtype": str(config.model.compute_dtype),
      "memory": memory,
      "hbm": target.hbm,
      "fits": fits,
      "flops": _flops_report(compiled, config, canvas_hw, program, batch_per_chip),
      "slow_ops": slow_ops(compiled.as_text()),
      "lower_seconds": round(t1 - t0, 2),
      "compile_seconds": round(t2 - t1, 2),
  }
  if program == "train":
    report["max_batch_per_chip_estimate"] = estimate_max_batch(report)
  return report


# --------------------------------------------------------------------------------------------------------------------
# The largest batch that fits.
# --------------------------------------------------------------------------------------------------------------------


def estimate_max_batch(report: dict) -> int:
  """The largest batch per chip a straight line through one compiled train step predicts to fit: the donated state
  (the aliased bytes) and the generated code stay, the rest of the total grows in proportion to the batch. An
  estimate: XLA's buffer reuse makes the temporaries grow a little less or more than linearly."""
  mem, batch = report["memory"], report["batch_per_chip"]
  fixed = mem["aliased"] + mem["generated_code"]
  per_image = (mem["total"] - fixed) / batch
  return max(0, math.floor((report["hbm"] - fixed) / per_image)) if per_image > 0 else batch


class _Probes:
  """The train steps a batch search has compiled, each batch once: its report or its DoesNotFit (`tried`), and
  (batch, fits, total bytes) of each compile in order (`compiles`)."""

  def __init__(self, config, target: Target, canvas_hw, known: dict | None, log):
    self.config, self.target, self.canvas_hw, self.log = config, target, canvas_hw, log
    self.tried = dict(known or {})
    self.compiles = []

  def fits(self, b: int) -> bool:
    """Whether batch b per chip fits, compiled the first time it is asked."""
    tried = self.tried
    if b not in tried:
      try:
        tried[b] = compile_program(self.config, self.target, "train", self.canvas_hw, b)
      except DoesNotFit as e:
        tried[b] = e
      ok = not isinstance(tried[b], DoesNotFit)
      total = self.total(b)
      self.compiles.append((b, ok, total))
      if self.log:
        size = f" ({format_gib(total)})" if total else ""
        self.log(f"  batch {b} per chip: {'fits' if ok else 'does not fit'}{size}")
    return not isinstance(tried[b], DoesNotFit)

  def total(self, b: int) -> float | None:
    """The bytes per device batch b needs, when compiled and known (XLA may refuse a program without a size)."""
    r = self.tried.get(b)
    if r is None:
      return None
    return r.total_bytes if isinstance(r, DoesNotFit) else r["memory"]["total"]

  def line_guess(self) -> int | None:
    """Where a straight line through the measured totals reaches the HBM, or None without two points to draw it
    through (one compile that fits: its own line, `estimate_max_batch`)."""
    tried, total = self.tried, self.total
    points = sorted((b, total(b)) for b in tried if total(b))
    if len(points) == 1 and not isinstance(tried[points[0][0]], DoesNotFit):
      return estimate_max_batch(tried[points[0][0]])  # one compile: the line through its per-image part
    if len(points) < 2:
      return None
    # The two measured batches nearest the bracket: the largest fit and the smallest failure when both are known.
    fit_points = [p for p in points if not isinstance(tried[p[0]], DoesNotFit)]
    fail_points = [p for p in points if isinstance(tried[p[0]], DoesNotFit)]
    pair = (fit_points[-1:] + fail_points[:1]) if fit_points and fail_points else points[-2:]
    if len(pair) < 2 or pair[1][1] <= pair[0][1]:
      return None
    (b0, t0), (b1, t1) = pair
    return math.floor(b0 + (self.target.hbm - t0) * (b1 - b0) / (t1 - t0))


def _next_probe(lo: int, hi: int | None, guess: int | None) -> int:
  """The batch to compile next inside the bracket (lo: the largest batch known to fit, 0: none; hi: the smallest
  known not to, None: none yet): the line's guess kept inside it, else halving, doubling or bisecting."""
  if lo == 0:  # nothing fits yet: halve towards 1
    return max(1, hi // 2) if guess is None else max(1, min(guess, hi - 1))
  if guess is None:
    return 2 * lo if hi is None else (lo + hi) // 2
  return max(guess, lo + 1) if hi is None else min(max(guess, lo + 1), hi - 1)


def search_max_batch(config, target: Target, canvas_hw, *, start: int = 1, known: dict | None = None,
                     log=None) -> dict:
  """The largest batch per chip whose train step fits `target`, by compiling.

  Memory grows about linearly with the batch (the state and the code are fixed, the activations per image), so the
  next probe is where a straight line reaches the HBM: after one compile that fits, the line of
  `estimate_max_batch`; after two, the line through their totals. The batch after a probe that fits is compiled at
  once to close the bracket: from a start that fits, three compiles when the line is right. Without two totals to
  draw the line through (the first probe, or XLA refusing a program without saying its size) the search doubles
  from `start` (halves when `start` does not fit) and bisects the bracket.
  `known` maps batches already compiled to their reports (or DoesNotFit), so they are not compiled again.

  Returns {"max_batch_per_chip": n (0: not even one image fits), "compiles": [(batch, fits, total bytes), ...]}.
  """
  probes = _Probes(config, target, canvas_hw, known, log)
  lo, hi = 0, None  # lo: the largest batch known to fit (0: none); hi: the smallest known not to
  b = max(1, int(start))
  if probes.fits(b):
    lo = b
  else:
    hi = b
  while hi is None or hi - lo > 1:
    guess = probes.line_guess()
    probe = _next_probe(lo, hi, guess)
    if probes.fits(probe):
      lo = probe
      if guess is not None and (hi is None or probe + 1 < hi):
        # The line's guess is usually right: the batch after it closes the bracket.
        if probes.fits(probe + 1):
          lo = probe + 1
        else:
          hi = probe + 1
    else:
      hi = probe
      if lo == 0 and probe == 1:
        break
  return {"max_batch_per_chip": lo, "compiles": probes.compiles}


# --------------------------------------------------------------------------------------------------------------------
# The command's work and its report.
# --------------------------------------------------------------------------------------------------------------------


def default_batch_per_chip(config, target: Target) -> int:
  batch = int(config.train.batch_size)
  if batch % target.num_devices:
    raise ValueError(f"train.batch_size {batch} is not a multiple of the {target.num_devices} devices of "
                     f"{target.topology}; give --batch_per_chip")
  return batch // target.num_devices


def describe(report: dict, target: Target) -> str:
  """A report of `compile_program` as a few lines of text."""
  mem, fl, ops = report["memory"], report["flops"], report["slow_ops"]
  name = "train step" if report["program"] == "train" else "inference"
  h, w = report["canvas_hw"]
  estimate = report.get("max_batch_per_chip_estimate")
  gib = format_gib
  lines = [
      (f"{name}, canvas {h}x{w}, {report['batch_per_chip']} images per chip (global {report['global_batch']} over "
       f"{target.num_devices} x {target.device_kind}), {report['compute_dtype']}; compiled in "
       f"{report['compile_seconds']:.0f} s"),
      (f"  memory per device: arguments {gib(mem['arguments'])}, outputs {gib(mem['outputs'])} (aliased "
       f"{gib(mem['aliased'])}), temporaries {gib(mem['temporaries'])}, generated code "
       f"{gib(mem['generated_code'])}; total {gib(mem['total'])} of {gib(report['hbm'])} HBM "
       f"({100 * mem['total'] / report['hbm']:.0f}%): {'fits' if report['fits'] else 'DOES NOT FIT'}"
       + ("" if estimate is None else f"; estimated largest batch per chip {estimate} (linear, not compiled)")),
      (f"  FLOPs per image: XLA {fl['xla_per_image']:.4g}, by hand {fl['hand_per_image']:.4g} (XLA / hand "
       f"{fl['xla_over_hand']:.2f}); per step per device: XLA {fl['xla_per_device']:.4g}"),
      (f"  slow on TPU: {ops['scatter']} scatters, {ops['gather']} gathers ({ops['gather_large']} from an operand "
       f"of >= 1 MiB), {ops['while']} while loops, {ops['conditional']} conditionals, {ops['sort']} sorts, "
       f"{ops['host_transfer']} host transfers, {ops['f64']} f64 ops"),
  ]
  for category in ("scatter", "gather_large", "while"):
    for site, n in list(ops["sites"].get(category, {}).items())[:6]:
      lines.append(f"    {category} x{n}: {site}")
  for shape, n in list(ops["large_gathers"].items())[:4]:
    lines.append(f"    large gather operand x{n}: {shape}")
  return "\n".join(lines)


def _search(config, target: Target, canvas, batch: int, log):
  """The train step at `batch` per chip (its report, or its DoesNotFit) and the batch search from there, which
  does not compile `batch` again: ((report or DoesNotFit), `search_max_batch`'s result)."""
  log(f"searching the largest batch per chip of the train step at {canvas[0]}x{canvas[1]}:")
  known = {}
  try:
    known[batch] = compile_program(config, target, "train", canvas, batch)
  except DoesNotFit as e:
    known[batch] = e
  found = search_max_batch(config, target, canvas, start=batch, known=known, log=log)
  log(f"  largest batch per chip that fits: {found['max_batch_per_chip']}")
  return known[batch], found


def run(config, topology: str, *, programs=PROGRAMS, batch_per_chip: int | None = None, search: bool = False,
        hbm_gib: float | None = None, log=print) -> dict:
  """Everything the command does, as a function: compile `programs` for each canvas on `topology`.

  Returns a JSON-able dict: versions, the target, one report per (program, canvas), with `search` the largest
  batch per chip per canvas, and "errors": the one-line DoesNotFit message of each program that does not fit at the
  batch asked for (its entry in "programs" says fits False). Raises AotUnavailable.
  """
  target = Target.make(topology, hbm_gib=hbm_gib)
  batch = default_batch_per_chip(config, target) if batch_per_chip is None else int(batch_per_chip)
  result = {
      "jax": jax.__version__,
      "libtpu": libtpu_version(),
      "topology": topology,
      "device_kind": target.device_kind,
      "num_devices": target.num_devices,
      "hbm_bytes": target.hbm,
      "compute_dtype": str(config.model.compute_dtype),
      "note": "compiled on the CPU for the topology (deviceless AOT), not run",
      "programs": [],
      "errors": [],
  }
  if search:
    result["max_batch_per_chip"] = {}
  for canvas in canvases(config):
    for program in programs:
      if program == "train" and search:
        report, found = _search(config, target, canvas, batch, log)
        result["max_batch_per_chip"][f"{canvas[0]}x{canvas[1]}"] = found
      else:
        try:
          report = compile_program(config, target, program, canvas, batch)
        except DoesNotFit as e:
          report = e
      if isinstance(report, DoesNotFit):
        result["errors"].append(str(report))
        result["programs"].append({"program": program, "canvas_hw": list(canvas), "batch_per_chip": batch,
                                   "compute_dtype": str(config.model.compute_dtype), "fits": False,
                                   "needs_bytes": report.total_bytes, "error": str(report)})
        continue
      log(describe(report, target))
      result["programs"].append(report)
  return result
