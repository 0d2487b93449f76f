"""FPN anchors: for one padded image shape (numpy, `generate_anchors`) and per image on a canvas (`frame_anchors`).

The anchors of a padded image depend only on its (static) shape, so `generate_anchors` computes them on the host
with numpy. On a canvas shared by images of different sizes, each image's anchors are those `generate_anchors` gives
for its own frame (`ops.frames`), laid out on the canvas's grid: `frame_anchors` computes them inside the program,
with a validity mask for the cells outside the frame. Two conventions are supported, because pretrained weights were trained against one
of them and a converted RPN only reproduces its proposals with the anchors it was trained with:

- "detectron2" (`DefaultAnchorGenerator`): exact (unrounded) cell anchors, sizes outer and aspect ratios inner;
  centres at `(offset + i) * stride` with the configured stride.
- "torchvision" (`AnchorGenerator`): cell anchors rounded to integers, aspect ratios outer and sizes inner; the
  stride of a level is `image_size // grid_size`, which is not the nominal stride when the image size is not a
  multiple of it (e.g. P6 of an 800-pixel side: 800 // 13 = 61, not 64).

Within a level, anchors are ordered by location (row-major: y outer, x inner), then by cell anchor, which is the
layout of an RPN head's (H, W, A) output flattened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops import frames as frame_ops

CONVENTIONS = ("detectron2", "torchvision")


def _is_sequence(x):
  return isinstance(x, (list, tuple, np.ndarray))


def _per_level(name, values, num_levels, allow_flat):
  """Returns one tuple of floats per level from `values`.

  Accepts a tuple per level, or a single tuple broadcast to every level (written flat, when `allow_flat`, or as a
  one-element tuple of tuples, as Detectron2 allows).
  """
  if not _is_sequence(values) or len(values) == 0:
    raise ValueError(f"{name} must be a non-empty sequence, got {values!r}")
  nested = [_is_sequence(v) for v in values]
  if not any(nested):
    if not allow_flat:
      # A flat sizes list is ambiguous: torchvision reads it as one size per level, Detectron2 as the sizes of every
      # level. Make the caller say which.
      raise ValueError(f"{name} must hold one tuple per level, e.g. ((32,), (64,)), got {values!r}")
    values = [values]
  elif not all(nested):
    raise ValueError(f"{name} mixes numbers and sequences: {values!r}")
  if len(values) == 1:
    values = list(values) * num_levels
  if len(values) != num_levels:
    raise ValueError(f"{name} has {len(values)} entries but there are {num_levels} levels (strides)")
  out = []
  for v in values:
    if len(v) == 0:
      raise ValueError(f"{name} has an empty entry: {values!r}")
    if any(float(x) <= 0 for x in v):
      raise ValueError(f"{name} must be positive, got {v!r}")
    out.append(tuple(float(x) for x in v))
  return out


def feature_shape(image_hw: Sequence[int], stride: int) -> tuple[int, int]:
  """Grid size (H_l, W_l) of the feature map at `stride` for a padded image of size image_hw.

  Every stride-2 stage of the backbone and FPN (the 7x7 stem, the max pool, the strided 3x3/1x1 convolutions, and
  the 1x1 max pool that makes P6) maps n to ceil(n / 2), so a level of stride 2**k halves n with ceil k times
  (which equals ceil(n / 2**k)). On an 800-pixel side P6 is 13 cells, covering 832 pixels. Strides that are not
  powers of two come from some other network: pass their feature_shapes explicitly.
  """
  stride = int(stride)
  if stride < 1 or stride & (stride - 1):
    raise ValueError(f"stride {stride} is not a power of two; pass feature_shapes explicitly")
  shape = []
  for n in image_hw:
    n = int(n)
    s = stride
    while s > 1:
      n = -(-n // 2)
      s //= 2
    shape.append(n)
  return tuple(shape)


def _cell_anchors_detectron2(sizes, aspect_ratios):
  """Zero-centred anchors (A, 4) float32, A = len(sizes) * len(aspect_ratios), sizes outer, ratios inner."""
  anchors = []
  for size in sizes:
    area = size**2.0
    for ratio in aspect_ratios:
      # ratio = h / w and w * h = area; computed in float64 and rounded to float32 once, as Detectron2 does.
      w = math.sqrt(area / ratio)
      h = ratio * w
      anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  return np.asarray(anchors, np.float64).astype(np.float32)


def _cell_anchors_torchvision(sizes, aspect_ratios):
  """Zero-centred anchors (A, 4) float32, ratios outer, sizes inner, rounded to integers.

  Every step stays in float32 as in torchvision, so that the rounding (half to even, like torch.round) falls on the
  same side.
  """
  scales = np.asarray(sizes, np.float32)
  ratios = np.asarray(aspect_ratios, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
  return np.round(base).astype(np.float32)


def _grid_anchors(cell, grid_hw, shifts_y, shifts_x):
  """cell: (A, 4) float32; shifts_y: (H,), shifts_x: (W,) float32 -> (H * W * A, 4) float32, location-major."""
  shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
  shift_x = shift_x.reshape(-1)
  shift_y = shift_y.reshape(-1)
  shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)
  anchors = (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)
  assert anchors.shape[0] == grid_hw[0] * grid_hw[1] * cell.shape[0]
  return anchors.astype(np.float32)


def num_anchors_per_location(sizes, aspect_ratios, num_levels: int) -> list[int]:
  """Cell anchors per location of each level (what the RPN head's output channels are built from)."""
  sizes = _per_level("sizes", sizes, num_levels, allow_flat=False)
  aspect_ratios = _per_level("aspect_ratios", aspect_ratios, num_levels, allow_flat=True)
  return [len(s) * len(a) for s, a in zip(sizes, aspect_ratios)]


def generate_anchors(
    image_hw: Sequence[int],
    strides: Sequence[int],
    sizes: Sequence[Sequence[float]],
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]],
    offset: float = 0.0,
    convention: str = "detectron2",
    feature_shapes: Sequence[Sequence[int]] | None = None,
) -> list[np.ndarray]:
  """Anchors of every FPN level for a padded image of size image_hw.

  Args:
    image_hw: (height, width) of the padded input batch, in pixels.
    strides: one stride per level, e.g. (4, 8, 16, 32, 64).
    sizes: one tuple of anchor sizes (sqrt of the area, pixels) per level, e.g. ((32,), (64,), (128,), (256,),
      (512,)); a single tuple of tuples is used for every level.
    aspect_ratios: h / w of the cell anchors: one tuple per level, or one tuple (flat or nested) for all levels.
    offset: centre of the first anchor in units of the stride, in [0, 1) ("detectron2" only; Detectron2's default
      is 0.0, 0.5 puts centres in the middle of each cell). Must be 0 for "torchvision".
    convention: "detectron2" or "torchvision" (see the module docstring).
    feature_shapes: (H_l, W_l) per level; by default computed from image_hw with `feature_shape`.

  Returns:
    A list with one numpy float32 array (H_l * W_l * A_l, 4) XYXY per level, absolute pixels; A_l = number of
    sizes x number of aspect ratios of that level. Anchors extend beyond the image at the borders (not clipped).
  """
  if convention not in CONVENTIONS:
    raise ValueError(f"unknown anchor convention {convention!r}; expected one of {CONVENTIONS}")
  if len(image_hw) != 2:
    raise ValueError(f"image_hw must be (height, width), got {image_hw!r}")
  if not _is_sequence(strides) or len(strides) == 0:
    raise ValueError(f"strides must be a non-empty sequence, got {strides!r}")
  num_levels = len(strides)
  sizes = _per_level("sizes", sizes, num_levels, allow_flat=False)
  aspect_ratios = _per_level("aspect_ratios", aspect_ratios, num_levels, allow_flat=True)
  if feature_shapes is None:
    feature_shapes = [feature_shape(image_hw, s) for s in strides]
  elif len(feature_shapes) != num_levels:
    raise ValueError(f"{len(feature_shapes)} feature_shapes given for {num_levels} levels (strides)")
  feature_shapes = [tuple(int(n) for n in hw) for hw in feature_shapes]
  if any(len(hw) != 2 or min(hw) < 1 for hw in feature_shapes):
    raise ValueError(f"feature_shapes must be positive (H, W) pairs, got {feature_shapes!r}")
  if convention == "torchvision" and offset != 0:
    raise ValueError("the torchvision convention has no anchor offset; use offset=0.0")
  if not 0.0 <= offset < 1.0:
    raise ValueError(f"offset must lie in [0, 1), got {offset}")

  anchors = []
  for stride, size, ratios, grid_hw in zip(strides, sizes, aspect_ratios, feature_shapes):
    if convention == "detectron2":
      cell = _cell_anchors_detectron2(size, ratios)
      stride_hw = (float(stride), float(stride))
      start = offset
    else:
      cell = _cell_anchors_torchvision(size, ratios)
      # torchvision infers the stride from the padded image and the feature map, ignoring the configured one.
      stride_hw = tuple(int(n) // g for n, g in zip(image_hw, grid_hw))
      start = 0.0
    # float64 then float32, like torch.arange(offset * stride, n * stride, stride, dtype=float32) on the host.
    shifts_y = (start * stride_hw[0] + np.arange(grid_hw[0], dtype=np.float64) * stride_hw[0]).astype(np.float32)
    shifts_x = (start * stride_hw[1] + np.arange(grid_hw[1], dtype=np.float64) * stride_hw[1]).astype(np.float32)
    anchors.append(_grid_anchors(cell, grid_hw, shifts_y, shifts_x))
  return anchors


def frame_anchors(
    canvas_hw: Sequence[int],
    frames,
    strides: Sequence[int],
    sizes: Sequence[Sequence[float]],
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]],
    offset: float = 0.0,
    convention: str = "detectron2",
    size_divisibility: int = 1,
):
  """Each image's anchors on a shared canvas: those of `generate_anchors(frame)` on the canvas's grid.

  Args:
    canvas_hw: (H, W) of the padded batch (static).
    frames: (B, 2) int32 frame of each image (`ops.frames.image_frames`), each at most the canvas.
    strides, sizes, aspect_ratios, offset, convention: as in `generate_anchors`.
    size_divisibility: what every frame is a multiple of; a level whose stride divides it has frame-independent
      anchors in either convention.

  Returns:
    (anchors, valid): per level, anchors XYXY float32, either a numpy (H_l * W_l * A_l, 4) array shared by every
    image (the level's anchors do not depend on the frame) or a (B, H_l * W_l * A_l, 4) array computed in the
    program, and valid (B, H_l * W_l * A_l) bool, in the canvas grid's layout (y, x, cell anchor). The anchors of
    cells inside an image's frame (the first ceil(frame / stride) rows and columns) are exactly
    `generate_anchors(frame)`'s, in the same order; the other cells are marked invalid. "detectron2" anchors never
    depend on the frame; "torchvision" ones do where the stride it infers, frame // grid, is not the level's (P6:
    61 px on an 800-pixel side, 64 on a 1088 one). Shared anchors are constants of the program, which XLA folds
    into the anchor matching (and so computes identically however the batch is sharded).
  """
  if convention not in CONVENTIONS:
    raise ValueError(f"unknown anchor convention {convention!r}; expected one of {CONVENTIONS}")
  num_levels = len(strides)
  sizes = _per_level("sizes", sizes, num_levels, allow_flat=False)
  aspect_ratios = _per_level("aspect_ratios", aspect_ratios, num_levels, allow_flat=True)
  frames = jnp.asarray(frames, jnp.int32)
  b = frames.shape[0]
  anchors, valid = [], []
  for stride, size, ratios in zip(strides, sizes, aspect_ratios):
    grid_hw = feature_shape(canvas_hw, stride)
    inside = frame_ops.inside_frame(frames, stride, grid_hw)  # (B, H_l, W_l)
    if convention == "detectron2" or int(size_divisibility) % int(stride) == 0:
      # The canvas's anchors are every frame's (the strides are the nominal ones), padded with more cells.
      level = generate_anchors(canvas_hw, (stride,), (size,), (ratios,), offset, convention, (grid_hw,))[0]
      num_cells = level.shape[0] // (grid_hw[0] * grid_hw[1])
    else:
      cell = jnp.asarray(_cell_anchors_torchvision(size, ratios))
      # torchvision's AnchorGenerator: integer strides frame // grid, integer shifts index * stride, then + cell.
      step = frames // frame_ops.frame_extent(frames, stride)  # (B, 2)
      ys = jnp.arange(grid_hw[0], dtype=jnp.int32)[None, :] * step[:, 0, None]  # (B, H_l)
      xs = jnp.arange(grid_hw[1], dtype=jnp.int32)[None, :] * step[:, 1, None]  # (B, W_l)
      sy = jnp.broadcast_to(ys[:, :, None], (b,) + grid_hw).astype(jnp.float32)
      sx = jnp.broadcast_to(xs[:, None, :], (b,) + grid_hw).astype(jnp.float32)
      shifts = jnp.stack([sx, sy, sx, sy], axis=-1).reshape(b, -1, 1, 4)
      level = (shifts + cell[None, None]).reshape(b, -1, 4)
      num_cells = cell.shape[0]
    anchors.append(level)
    valid.append(jnp.repeat(inside.reshape(b, -1), num_cells, axis=1))
  return anchors, valid
