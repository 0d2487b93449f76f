r"""Compile the train step and the inference program for a TPU topology on a machine that has no TPU.

  python -m mrcnn_jax.aot --config=configs/FILE.py[:arg] --topology=v5e:2x2 [--dtype=bfloat16] [--json=PATH] \
      [--batch_per_chip=N] [--search_max_batch] [--programs=train,infer] [--config.key=value ...]

libtpu (the `tpu-aot` extra: `pip install -e '.[tpu-aot]'`) compiles for a named topology without the chips:
`jax.experimental.topologies.get_topology_desc` gives abstract devices of that slice, a Mesh of them takes the
program's shardings, and `jit(...).lower(abstract inputs).compile()` runs XLA:TPU's whole pipeline (SPMD
partitioning, fusion, layout, memory assignment) on the CPU. Nothing runs and no array is made: the state is
`jax.eval_shape` of `train.create_train_state`, the batch `jax.ShapeDtypeStruct`s with their shardings.

For each canvas of the config (`canvases`) and each program it reports, per device (one device is one chip; a v4 or
v5p chip is one megacore device, as JAX sees it on those machines):

- compiled memory (`compiled.memory_analysis()`): arguments, outputs (and how much of them alias donated
  arguments), temporaries, generated code; total = arguments + outputs - aliased + temporaries + code, against
  the chip's HBM (`HBM_BYTES`). A program over the HBM, or one XLA refuses with RESOURCE_EXHAUSTED, is `DoesNotFit`.
- XLA's FLOP estimate of one step (`compiled.cost_analysis()["flops"]`, per device) against `hand_flops`, the
  convolutions and dense layers counted by hand (its docstring says where the two differ and why).
- ops that are slow on TPU, counted in the compiled HLO text (`slow_ops`): scatters, gathers (and the large
  operands they read), while loops, conditionals, sorts, host transfers, f64 ops, each with where it comes from.

The train step is `train.jit_train_step` over a 1-D Mesh of the topology's devices: the global batch
(batch_per_chip x devices; default the config's train.batch_size) sharded on the data axis, the state replicated
and donated. The inference program is `mask_rcnn.build_infer`'s, its batch sharded the same way and the variables
replicated. `--search_max_batch` finds the largest batch per chip whose train step fits (`search_max_batch`).

Refusals are one line and a non-zero exit: no libtpu, an unknown topology (`AotUnavailable`, exit 2), a program
that does not fit (`DoesNotFit`, exit 3).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

GiB = 1024**3

# HBM per chip by the device_kind JAX reports for it, from Google's Cloud TPU pages: v4 "32 GiB", v5e "16 GB",
# v5p "95 GB", v6e "32 GB" (the pages write GB for GiB: XLA:TPU's own refusal of a program for a v5e reads "exceeds
# available HBM (15.75G)", the 16 GiB less what the runtime keeps). XLA refuses what does not fit its own budget;
# this table is the chip's whole HBM, the ceiling a compiled program's total is checked against.
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5": 95 * GiB,  # v5p
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
}

# Chips that JAX drives as one "megacore" device of two TensorCores; libtpu's default for a topology of them is one
# device per core, which is not what a program on those machines sees.
_MEGACORE = ("v4", "v5p")
# TPU_ACCELERATOR_TYPE names: the slice's generation and its core count (two per v4 / v5p chip).
_ACCELERATOR_PREFIX = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5litepod", 1), "v6e": ("v6e", 1)}

PROGRAMS = ("train", "infer")


class AotUnavailable(RuntimeError):
  """Deviceless compilation is refused here: libtpu missing, or a topology it does not know."""


class DoesNotFit(RuntimeError):
  """A program needs more memory per device than the chip's HBM."""

  def __init__(self, message: str, *, program: str, batch_per_chip: int, total_bytes: float | None):
    super().__init__(message)
    self.program = program
    self.batch_per_chip = batch_per_chip
    self.total_bytes = total_bytes


def canvases(config) -> list[tuple[int, int]]:
  """The canvases (h, w) the config compiles one program for. The only place that reads the canvas field."""
  from mrcnn_jax.data import transforms

  return transforms.canvases(config.input)


# --------------------------------------------------------------------------------------------------------------------
# The topology.
# --------------------------------------------------------------------------------------------------------------------


def _generation(topology: str) -> str:
  return topology.split(":", 1)[0].lower()


def libtpu_environment(topology: str) -> None:
  """Environment defaults for libtpu on a machine without TPUs, read when libtpu initializes (the first
  `topology_devices` call of the process); values already set are kept.

  TPU_SKIP_MDS_QUERY: do not ask the GCE metadata server (there is none) what this machine is.
  TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES, TPU_WORKER_ID: what it would have said, so that libtpu does not log
    that it could not find them.
  ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu takes /tmp/libtpu_lockfile to keep a second process off the chips; with no
    chips to share, a second compiling process (a test worker, another user) must not be refused.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  gen, _, shape = topology.partition(":")
  prefix = _ACCELERATOR_PREFIX.get(gen.lower())
  if prefix and re.fullmatch(r"\d+(x\d+)*", shape):
    chips = math.prod(int(d) for d in shape.split("x"))
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{prefix[0]}-{chips * prefix[1]}")


def libtpu_version() -> str | None:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> list:
  """The abstract devices of a TPU slice, e.g. "v5e:2x2" (4 "TPU v5 lite"), "v4:2x2x1" (4 megacore "TPU v4").

  Raises AotUnavailable (one line) when libtpu is not installed or refuses the name.
  """
  if not libtpu_installed():
    raise AotUnavailable(f"cannot compile for TPU topology {topology!r}: libtpu is not installed "
                         "(pip install -e '.[tpu-aot]')")
  from jax.experimental import topologies

  libtpu_environment(topology)
  kwargs = {"chip_config_name": "megacore"} if _generation(topology) in _MEGACORE else {}
  with _libtpu_stderr() as held:
    try:
      desc = topologies.get_topology_desc(topology, "tpu", **kwargs)
    except (RuntimeError, ValueError) as e:  # libtpu: a JaxRuntimeError with a multi-line status
      held["drop"] = True  # its log lines say the same at length; the refusal is one line
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise AotUnavailable(f"cannot compile for TPU topology {topology!r} here: {first}") from None
  return list(desc.devices)


# libtpu's complaints, on a machine that is not a TPU VM, about what the metadata server would have told it.
_METADATA_NOISE = re.compile(r"could not determine TPU|host bounds for accelerator type|metadata", re.IGNORECASE)


@contextlib.contextmanager
def _libtpu_stderr():
  """Holds what libtpu writes to the stderr file descriptor (from C++, past Python's sys.stderr) while it
  initializes, then writes it out less its metadata-server noise, or drops it all when the caller sets
  held["drop"] (a refusal that says the same in one line)."""
  held = {"drop": False}
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield held
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read().decode(errors="replace")
  if not held["drop"]:
    keep = [line for line in text.splitlines() if line.strip() and not _METADATA_NOISE.search(line)]
    if keep:
      print("\n".join(keep), file=sys.stderr)


def hbm_bytes(device_kind: str) -> int:
  try:
    return HBM_BYTES[device_kind]
  except KeyError:
    raise AotUnavailable(f"no HBM size known for {device_kind!r}; add it to mrcnn_jax.aot.HBM_BYTES") from None


# --------------------------------------------------------------------------------------------------------------------
# Abstract inputs.
# --------------------------------------------------------------------------------------------------------------------


def _abstract(tree, sharding):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


_STATE_SHAPES = {}  # config JSON -> the TrainState's shapes: a batch search traces the state once


def abstract_state(config, mesh):
  """The TrainState of `config` as ShapeDtypeStructs replicated over `mesh` (jax.eval_shape: no arrays, no init)."""
  from mrcnn_jax import train

  key = config.to_json_best_effort(sort_keys=True)
  if key not in _STATE_SHAPES:
    # Parameter shapes do not depend on the canvas; a small one keeps the trace short.
    _STATE_SHAPES[key] = jax.eval_shape(lambda k: train.create_train_state(config, k, (64, 64)), jax.random.key(0))
  return _abstract(_STATE_SHAPES[key], NamedSharding(mesh, P()))


def abstract_train_batch(config, mesh, canvas_hw, global_batch: int) -> dict:
  """The arrays `data.examples` gives, stacked to (global_batch, ...) and sharded over the mesh's first
  axis, as the trainer passes them (image_id is int32 without x64)."""
  from mrcnn_jax.data import examples

  inp = config.input
  b, (h, w), g, m = global_batch, canvas_hw, int(inp.max_instances), int(inp.gt_mask_size)
  k = examples.num_keypoints(inp)
  shapes = {
      "image": ((b, h, w, 3), jnp.float32),
      "image_info": ((b, 6), jnp.float32),
      "gt_boxes": ((b, g, 4), jnp.float32),
      "gt_classes": ((b, g), jnp.int32),
      "gt_valid": ((b, g), jnp.bool_),
      "gt_is_crowd": ((b, g), jnp.bool_),
      "gt_masks": ((b, g, m, m), jnp.uint8),
      "gt_keypoints": ((b, g, k, 3), jnp.float32),
      "image_id": ((b,), jnp.int32),
      "num_dropped": ((b,), jnp.int32),
      "num_skipped": ((b,), jnp.int32),
  }
  sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for key, (shape, dtype) in shapes.items()}


def lower_train_step(config, mesh, canvas_hw, global_batch: int):
  """`train.jit_train_step(config, ...)` lowered for `mesh` on abstract inputs: a jax.stages.Lowered."""
  from mrcnn_jax import train
  from mrcnn_jax.modeling import mask_rcnn

  step = train.jit_train_step(config, mask_rcnn.build_model(config, train=True), mesh)
  return step.lower(abstract_state(config, mesh), abstract_train_batch(config, mesh, canvas_hw, global_batch))


def lower_infer(config, mesh, canvas_hw, global_batch: int):
  """`mask_rcnn.build_infer(config)` lowered for `mesh`: variables replicated, images and image_info sharded."""
  from mrcnn_jax.modeling import mask_rcnn

  state = abstract_state(config, mesh)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  data = NamedSharding(mesh, P(mesh.axis_names[0]))
  h, w = canvas_hw
  images = jax.ShapeDtypeStruct((global_batch, h, w, 3), jnp.float32, sharding=data)
  info = jax.ShapeDtypeStruct((global_batch, 6), jnp.float32, sharding=data)
  return mask_rcnn.build_infer(config).lower(variables, images, info)


# --------------------------------------------------------------------------------------------------------------------
# FLOPs by hand.
# --------------------------------------------------------------------------------------------------------------------


def _out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


@dataclasses.dataclass
class _Counter:
  """Multiply-accumulates of one image, by part, forward and train step (forward + backward)."""

  forward: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
  train: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(float))

  def add(self, part: str, macs: float, *, passes: int) -> None:
    # passes: 3 for a trained layer whose input needs a gradient (forward, d input, d kernel), 2 when its input
    # needs none (a stop-gradient, frozen stage's output), 1 for a frozen layer (forward only).
    self.forward[part] += macs
    self.train[part] += passes * macs


def hand_flops(config, canvas_hw, *, train: bool) -> dict:
  """FLOPs of one image through the model, counted by hand: 2 x multiply-accumulates of every convolution and
  dense layer, by part ({"backbone": ..., "fpn": ..., "rpn": ..., "box_head": ..., "mask_head": ...,
  "keypoint_head": ..., "total": ...}).

  A convolution of a k x k kernel from C_in to C_out channels producing an H_o x W_o map is H_o W_o k^2 C_in C_out
  MACs (every output pixel counts k^2 taps, padded ones too); a dense layer D_in -> D_out on R rows is R D_in D_out.
  - backbone + FPN at the canvas: the stem (7x7, stride 2), the residual stages (1x1 / 3x3 / 1x1 bottlenecks, or
    3x3 / 3x3 basic blocks, shortcut 1x1 where the shape changes, the stride where the config puts it), FPN's
    lateral 1x1 and output 3x3 on P2..P5 (P6 is a max-pool: no MACs);
  - RPN head: its 3x3 conv and the two 1x1 predictors on P2..P6;
  - box head: fc1 (res^2 C -> fc_dim), fc2, the class and box predictors, on R RoIs: the sampled
    roi_heads.batch_size_per_image in training, rpn.post_nms_topk_test at inference;
  - mask head: num_convs 3x3 convs at mask_resolution, the 2x2 stride-2 deconvolution (4 taps), the 1x1 predictor
    at twice the resolution, on the foreground RoIs: all batch_size_per_image x positive_fraction slots in training
    (the largest branch of the foreground switch: the worst case, the one that has to fit), detections_per_image
    at inference; the keypoint head likewise (its 4x4 deconvolution is 16 taps; the 2x bilinear upsampling is
    left out: under 0.1% of the head).
  train=True counts a train step: forward, then for each trained layer the input gradient and the kernel gradient
  (each as many MACs as the forward), i.e. 3x the forward, except the frozen stages (stem and res2 at freeze_at=2:
  forward only, 1x) and the layers that read a frozen stage's output (2x: no input gradient).

  Where XLA's count (`cost_analysis()["flops"]`) differs: XLA also counts every elementwise op (norms, ReLUs,
  residual adds, RoIAlign's weighted sums over its static K samples per bin, the losses, box decoding, NMS' IoU
  tiles, the optimizer update) as one FLOP per element, and counts a convolution's taps only where they hit the
  unpadded input; a while loop's body counts once, not per iteration (XLA does not multiply by the trip count), and
  a conditional counts its most expensive branch. So XLA is higher where a model is thin (small channel counts make
  elementwise work a larger share) and close to this count for R50-FPN, whose convolutions dominate.
  """
  m = config.model
  h, w = canvas_hw
  c = _Counter()
  frozen_at = int(m.backbone.freeze_at)
  width = int(m.backbone.width)
  bottleneck = int(m.backbone.depth) in (50, 101)
  from mrcnn_jax.modeling import resnet

  def conv(part, hw, k, stride, pad, cin, cout, *, passes):
    ho, wo = _out(hw[0], k, stride, pad), _out(hw[1], k, stride, pad)
    c.add(part, ho * wo * k * k * cin * cout, passes=passes)
    return ho, wo

  # Stem (stage 1).
  stem_passes = 1 if frozen_at >= 1 else 3
  hw = conv("backbone", (h, w), 7, 2, 3, 3, width, passes=stem_passes)
  hw = (_out(hw[0], 3, 2, 1), _out(hw[1], 3, 2, 1))  # max-pool 3x3, stride 2
  cin = width
  stage_out = {}
  for stage, (blocks, base) in enumerate(zip(resnet.STAGE_BLOCKS[int(m.backbone.depth)], resnet.STAGE_WIDTHS)):
    level = stage + 2
    trained = level > frozen_at
    wd = base * width // 64
    for i in range(blocks):
      stride = 2 if (i == 0 and level > 2) else 1
      # The first block of the first trained stage reads a frozen output: no input gradient there.
      first_passes = (3 if (i > 0 or level - 1 > frozen_at) else 2) if trained else 1
      passes = 3 if trained else 1
      cout = 4 * wd if bottleneck else wd
      if cin != cout or stride != 1:
        conv("backbone", hw, 1, stride, 0, cin, cout, passes=first_passes)
      if bottleneck:
        s1, s3 = (stride, 1) if m.backbone.stride_in_1x1 else (1, stride)
        mid = conv("backbone", hw, 1, s1, 0, cin, wd, passes=first_passes)
        mid = conv("backbone", mid, 3, s3, 1, wd, wd, passes=passes)
        hw = conv("backbone", mid, 1, 1, 0, wd, cout, passes=passes)
      else:
        mid = conv("backbone", hw, 3, stride, 1, cin, wd, passes=first_passes)
        hw = conv("backbone", mid, 3, 1, 1, wd, wd, passes=passes)
      cin = cout
    stage_out[level] = (hw, cin, trained)

  f = int(m.fpn.channels)
  level_hw = {}
  for level, (lhw, ch, trained) in stage_out.items():
    conv("fpn", lhw, 1, 1, 0, ch, f, passes=3 if trained else 2)
    conv("fpn", lhw, 3, 1, 1, f, f, passes=3)
    level_hw[level] = lhw
  top = max(level_hw)
  level_hw[top + 1] = (_out(level_hw[top][0], 1, 2, 0), _out(level_hw[top][1], 1, 2, 0))

  anchors = len(m.anchors.aspect_ratios) * len(m.anchors.sizes[0])
  for level in range(int(m.fpn.min_level), int(m.fpn.max_level) + 1):
    lhw = level_hw[level]
    conv("rpn", lhw, 3, 1, 1, f, f, passes=3)
    conv("rpn", lhw, 1, 1, 0, f, anchors, passes=3)
    conv("rpn", lhw, 1, 1, 0, f, 4 * anchors, passes=3)

  rh, pool, k1 = m.roi_heads, m.pooler, int(m.num_classes) + 1
  rois = int(rh.batch_size_per_image) if train else int(m.rpn.post_nms_topk_test)
  fc = int(rh.fc_dim)
  res = int(pool.box_resolution)
  c.add("box_head", rois * (res * res * f * fc + fc * fc + fc * k1 + fc * 4 * k1), passes=3)

  fg = int(rh.batch_size_per_image * rh.positive_fraction) if train else int(rh.detections_per_image)
  if m.mask_head.enabled:
    r, d = int(pool.mask_resolution), int(m.mask_head.conv_dim)
    macs, ch = 0, f
    for _ in range(int(m.mask_head.num_convs)):
      macs += r * r * 9 * ch * d
      ch = d
    macs += r * r * ch * 4 * d  # 2x2 stride-2 deconvolution as one matmul of 4 taps
    macs += (2 * r) ** 2 * d * k1  # 1x1 predictor
    c.add("mask_head", fg * macs, passes=3)
  if m.keypoint_head.enabled:
    r, d, kp = int(pool.keypoint_resolution), int(m.keypoint_head.conv_dim), int(m.keypoint_head.num_keypoints)
    macs, ch = 0, f
    for _ in range(int(m.keypoint_head.num_convs)):
      macs += r * r * 9 * ch * d
      ch = d
    macs += r * r * ch * 16 * kp  # 4x4 stride-2 deconvolution as one matmul of 16 taps
    c.add("keypoint_head", fg * macs, passes=3)

  counts = c.train if train else c.forward
  out = {part: 2.0 * macs for part, macs in counts.items()}
  out["total"] = sum(out.values())
  return out


# --------------------------------------------------------------------------------------------------------------------
# The compiled HLO: ops slow on TPU.
# --------------------------------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HOST_OPS = ("infeed", "outfeed", "send", "recv", "send-done", "recv-done")
# A gather reading at least this much is "large": a table that is not a few indices or boxes.
LARGE_GATHER_BYTES = 1 << 20


def _array_bytes(shape_text: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape_text):
    n = math.prod(int(d) for d in dims.split(",")) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
  return total


def _split_instruction(line: str):
  """(name, result shape text, opcode, operand names, rest) of one HLO instruction line, or None."""
  m = re.match(r"\s*(?:ROOT\s+)?%?([^\s=%]+)\s*=\s*", line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):  # a tuple shape: up to its matching parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  body, depth = rest[op.end():], 1
  for i, ch in enumerate(body):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      break
  operands = re.findall(r"%([\w.\-]+)", body[:i])
  return m.group(1), shape, op.group(1), operands, body[i + 1:]


def _site(attrs: str) -> str:
  """Where an op comes from, from its metadata op_name, with the per-branch and per-unroll noise taken out."""
  m = re.search(r'op_name="([^"]*)"', attrs)
  if not m:
    return "?"
  name = re.sub(r"^jit\([^)]*\)/", "", m.group(1))
  name = re.sub(r"branch_\d+_fun", "branch_*", name)
  name = re.sub(r"/(?:closed_call|pjit|remat)(?=/|$)", "", name)
  return name


def slow_ops(hlo_text: str) -> dict:
  """Counts of the ops that are slow on TPU in a compiled module's text (`compiled.as_text()`), each instruction
  once (inside fusions and loop bodies too; a while body's ops run once per iteration, which the counts do not
  multiply).

  Returns {"scatter": n, "gather": n, "gather_large": n, "while": n, "conditional": n, "sort": n,
  "host_transfer": n, "f64": n, "sites": {category: {site: count}}, "large_gathers": {"operand shape": count}}.
  A gather is large when its operand (the table it reads from) is at least LARGE_GATHER_BYTES. Host transfers are
  infeed / outfeed / send / recv and custom calls that move data to or from the host.
  """
  shapes, entries = {}, []
  for line in hlo_text.splitlines():
    parsed = _split_instruction(line)
    if parsed:
      shapes[parsed[0]] = parsed[1]
      entries.append(parsed)
  counts = collections.Counter()
  sites = collections.defaultdict(collections.Counter)
  large = collections.Counter()
  for name, shape, op, operands, attrs in entries:
    category = None
    if op in ("scatter", "while", "conditional", "sort"):
      category = op
    elif op == "gather":
      category = "gather"
      table = shapes.get(operands[0], "") if operands else ""
      if _array_bytes(table) >= LARGE_GATHER_BYTES:
        counts["gather_large"] += 1
        sites["gather_large"][_site(attrs)] += 1
        large[re.sub(r"\{[^}]*\}", "", table)] += 1
    elif op in _HOST_OPS or (op == "custom-call" and re.search(r'custom_call_target="[^"]*(?:[Hh]ost|MoveToDevice)',
                                                                   attrs)):
      category = "host_transfer"
    if category:
      counts[category] += 1
      sites[category][_site(attrs)] += 1
    if "f64[" in shape and op not in ("parameter", "get-tuple-element", "tuple", "bitcast"):
      counts["f64"] += 1
      sites["f64"][_site(attrs)] += 1
  out = {key: counts[key] for key in ("scatter", "gather", "gather_large", "while", "conditional", "sort",
                                       "host_transfer", "f64")}
  out["sites"] = {key: dict(value.most_common()) for key, value in sorted(sites.items())}
  out["large_gathers"] = dict(large.most_common())
  return out


# --------------------------------------------------------------------------------------------------------------------
# Compiling and reporting.
# --------------------------------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
  return f"{x / GiB:.2f} GiB"


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


@dataclasses.dataclass
class Target:
  """The topology compiled for: its devices, their kind, HBM per device and the mesh over them."""

  topology: str
  devices: list
  device_kind: str
  hbm: int
  mesh: object
  hbm_name: str = ""

  @classmethod
  def make(cls, topology: str, *, hbm_gib: float | None = None) -> Target:
    """`hbm_gib`, when given, is the budget per chip to fit in instead of the chip's whole HBM (to keep room for
    another program, or to plan for a smaller chip)."""
    from mrcnn_jax import train

    if hbm_gib is not None and not hbm_gib > 0:
      raise ValueError(f"--hbm_gib must be positive, got {hbm_gib}")
    devices = topology_devices(topology)
    kind = devices[0].device_kind
    if hbm_gib is None:
      return cls(topology, devices, kind, hbm_bytes(kind), train.make_mesh(devices))
    hbm = int(hbm_gib * GiB)
    return cls(topology, devices, kind, hbm, train.make_mesh(devices),
               f"the {_gib(hbm)} budget per chip (--hbm_gib; {kind} has {_gib(hbm_bytes(kind))})")

  @property
  def hbm_description(self) -> str:
    return self.hbm_name or f"{self.device_kind}'s {_gib(self.hbm)} HBM"

  @property
  def num_devices(self) -> int:
    return len(self.devices)


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
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA:TPU refuses a program over the HBM at compile time
    message = _oom_message(e)
    if message is None:
      raise
    used = _oom_used_bytes(message)
    raise DoesNotFit(f"{where} does not fit in {target.hbm_description}: XLA: {message}",
                     program=program, batch_per_chip=batch_per_chip, total_bytes=used) from None
  t2 = time.perf_counter()
  memory = memory_report(compiled)
  fits = memory["total"] <= target.hbm
  if check_fit and not fits:
    raise DoesNotFit(f"{where} does not fit in {target.hbm_description}: it needs "
                     f"{_gib(memory['total'])} per device", program=program, batch_per_chip=batch_per_chip,
                     total_bytes=memory["total"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan")))
  hand = hand_flops(config, canvas_hw, train=program == "train")
  report = {
      "program": program,
      "canvas_hw": list(canvas_hw),
      "batch_per_chip": batch_per_chip,
      "global_batch": global_batch,
      "compute_dtype": str(config.model.compute_dtype),
      "memory": memory,
      "hbm": target.hbm,
      "fits": fits,
      "flops": {
          "xla_per_device": xla_flops,
          "xla_per_image": xla_flops / batch_per_chip,
          "hand_per_image": hand["total"],
          "hand_per_image_by_part": {k: v for k, v in hand.items() if k != "total"},
          "xla_over_hand": xla_flops / batch_per_chip / hand["total"],
      },
      "slow_ops": slow_ops(compiled.as_text()),
      "lower_seconds": round(t1 - t0, 2),
      "compile_seconds": round(t2 - t1, 2),
  }
  if program == "train":
    report["max_batch_per_chip_estimate"] = estimate_max_batch(report)
  return report


def search_max_batch(config, target: Target, canvas_hw, *, start: int = 1, known: dict | None = None,
                     log=None) -> dict:
  """The largest batch per chip whose train step fits `target`, by compiling.

  Memory grows about linearly with the batch (the state and the code are fixed, the activations per image), so the
  next probe is where a straight line reaches the HBM: after one compile that fits, the line of
  `estimate_max_batch`; after two, the line through their totals. The batch after a probe that fits is compiled at
  once to close the bracket: from a start that fits, three compiles when the line is right. Without two totals to draw the line through (the first probe, or XLA refusing a program without saying its
  size) the search doubles from `start` (halves when `start` does not fit) and bisects the bracket.
  `known` maps batches already compiled to their reports (or DoesNotFit), so they are not compiled again.

  Returns {"max_batch_per_chip": n (0: not even one image fits), "compiles": [(batch, fits, total bytes), ...]}.
  """
  tried = dict(known or {})
  compiles = []

  def fits(b):
    if b not in tried:
      try:
        tried[b] = compile_program(config, target, "train", canvas_hw, b)
      except DoesNotFit as e:
        tried[b] = e
      ok = not isinstance(tried[b], DoesNotFit)
      compiles.append((b, ok, total(b)))
      if log:
        log(f"  batch {b} per chip: {'fits' if ok else 'does not fit'}" + (f" ({_gib(total(b))})" if total(b) else ""))
    return not isinstance(tried[b], DoesNotFit)

  def total(b):
    r = tried.get(b)
    if r is None:
      return None
    return r.total_bytes if isinstance(r, DoesNotFit) else r["memory"]["total"]

  def line_guess():
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
    return math.floor(b0 + (target.hbm - t0) * (b1 - b0) / (t1 - t0))

  lo, hi = 0, None  # lo: the largest batch known to fit (0: none); hi: the smallest known not to
  b = max(1, int(start))
  if fits(b):
    lo = b
  else:
    hi = b
  while hi is None or hi - lo > 1:
    guess = line_guess()
    if lo == 0:  # nothing fits yet: halve towards 1
      probe = max(1, hi // 2) if guess is None else max(1, min(guess, hi - 1))
    elif guess is None:
      probe = 2 * lo if hi is None else (lo + hi) // 2
    else:
      probe = max(guess, lo + 1) if hi is None else min(max(guess, lo + 1), hi - 1)
    if fits(probe):
      lo = probe
      if guess is not None and (hi is None or probe + 1 < hi):
        # The line's guess is usually right: the batch after it closes the bracket.
        if fits(probe + 1):
          lo = probe + 1
        else:
          hi = probe + 1
    else:
      hi = probe
      if lo == 0 and probe == 1:
        break
  return {"max_batch_per_chip": lo, "compiles": compiles}


def estimate_max_batch(report: dict) -> int:
  """The largest batch per chip a straight line through one compiled train step predicts to fit: the donated state
  (the aliased bytes) and the generated code stay, the rest of the total grows in proportion to the batch. An
  estimate: XLA's buffer reuse makes the temporaries grow a little less or more than linearly."""
  mem, batch = report["memory"], report["batch_per_chip"]
  fixed = mem["aliased"] + mem["generated_code"]
  per_image = (mem["total"] - fixed) / batch
  return max(0, math.floor((report["hbm"] - fixed) / per_image)) if per_image > 0 else batch


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
  lines = [
      (f"{name}, canvas {h}x{w}, {report['batch_per_chip']} images per chip (global {report['global_batch']} over "
       f"{target.num_devices} x {target.device_kind}), {report['compute_dtype']}; compiled in "
       f"{report['compile_seconds']:.0f} s"),
      (f"  memory per device: arguments {_gib(mem['arguments'])}, outputs {_gib(mem['outputs'])} (aliased "
       f"{_gib(mem['aliased'])}), temporaries {_gib(mem['temporaries'])}, generated code "
       f"{_gib(mem['generated_code'])}; total {_gib(mem['total'])} of {_gib(report['hbm'])} HBM "
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
        log(f"searching the largest batch per chip of the train step at {canvas[0]}x{canvas[1]}:")
        known = {}
        try:
          known[batch] = compile_program(config, target, "train", canvas, batch)
        except DoesNotFit as e:
          known[batch] = e
        found = search_max_batch(config, target, canvas, start=batch, known=known, log=log)
        key = f"{canvas[0]}x{canvas[1]}"
        result["max_batch_per_chip"][key] = found
        log(f"  largest batch per chip that fits: {found['max_batch_per_chip']}")
        report = known[batch]
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


# --------------------------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------------------------


def main(argv):
  from absl import flags

  from mrcnn_jax import atomic

  if len(argv) > 1:
    raise SystemExit(f"mrcnn_jax.aot: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  if f.dtype:
    config.model.compute_dtype = f.dtype
  programs = tuple(p.strip() for p in f.programs.split(",") if p.strip())
  bad = [p for p in programs if p not in PROGRAMS]
  if bad or not programs:
    raise SystemExit(f"mrcnn_jax.aot: --programs must name some of {PROGRAMS}, got {f.programs!r}")
  try:
    result = run(config, f.topology, programs=programs, batch_per_chip=f.batch_per_chip, search=f.search_max_batch,
                 hbm_gib=f.hbm_gib)
  except (AotUnavailable, ValueError) as e:
    print(f"mrcnn_jax.aot: {e}", file=sys.stderr)
    sys.exit(2)
  result["config"] = config.to_dict()
  if f.json:
    atomic.write_json(f.json, result)
    print(f"wrote {f.json}")
  # A program that does not fit fails the command, unless finding what fits was the question.
  nothing_fits = any(v["max_batch_per_chip"] == 0 for v in result.get("max_batch_per_chip", {}).values())
  if (result["errors"] and not f.search_max_batch) or nothing_fits:
    for error in result["errors"]:
      print(f"mrcnn_jax.aot: {error}", file=sys.stderr)
    sys.exit(3)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file: configs/FILE.py[:arg].", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Overrides config.model.compute_dtype.")
  flags.DEFINE_integer("batch_per_chip", None, "Images per chip (default: train.batch_size / devices).")
  flags.DEFINE_bool("search_max_batch", False, "Also find the largest batch per chip whose train step fits.")
  flags.DEFINE_string("programs", ",".join(PROGRAMS), "Programs to compile: train, infer or both.")
  flags.DEFINE_string("json", None, "Write the whole report as JSON here (atomically).")
  flags.DEFINE_float("hbm_gib", None, "Fit in this many GiB per chip instead of the chip's whole HBM.")
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  from absl import app

  # Deviceless: the only backend JAX initializes is the CPU's, whatever this machine has (on a TPU VM its chips would
  # be claimed otherwise). JAX_PLATFORMS, when set, still decides.
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  _define_flags()
  app.run(main)
