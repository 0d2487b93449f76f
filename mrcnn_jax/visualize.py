"""Overlays of detections on images: masks, boxes, labels and keypoints; image grids; atomic image files.

Everything here is host-side numpy and PIL, so a notebook or a CLI can draw without JAX:

  image = draw_instances(image, boxes, classes, scores, masks, class_names=names, score_threshold=0.5)
  save_image("out/000001.png", image)

Colours are per class, from a fixed palette (`class_color`), so the same class has the same colour in every image and
every run. Boxes are XYXY in absolute pixels of the image drawn on, as everywhere in the library.
"""

from __future__ import annotations

import colorsys
import functools
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mrcnn_jax import atomic
from mrcnn_jax.data import transforms

# COCO person keypoints (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles; left before right), joined
# as in the COCO annotation file's "skeleton" (there 1-based; 0-based here).
COCO_PERSON_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
NUM_COCO_KEYPOINTS = 17
# Keypoints whose score is at or below this are not drawn (Detectron2's visualizer uses the same 0.05 on the same
# heatmap scores; ground-truth visibility flags 1 and 2 pass it, 0 does not).
DEFAULT_KEYPOINT_THRESHOLD = 0.05

_PALETTE_SIZE = 64
# Consecutive hues a golden-ratio step apart: neighbouring labels (the usual case in a small label set) get far-apart
# hues, and the palette never changes between runs or machines.
_GOLDEN = 0.618033988749895


def _make_palette(size: int) -> np.ndarray:
  colors = []
  for i in range(size):
    hue = (0.13 + i * _GOLDEN) % 1.0
    # Alternate two brightness levels so that hues that come close again after many steps still differ.
    value = 0.95 if i % 2 == 0 else 0.75
    colors.append(colorsys.hsv_to_rgb(hue, 0.85, value))
  return np.rint(np.asarray(colors) * 255).astype(np.uint8)


PALETTE = _make_palette(_PALETTE_SIZE)  # (64, 3) uint8 RGB


def class_color(label: int) -> tuple[int, int, int]:
  """The RGB colour (uint8 values) of class `label`; labels past the palette wrap around."""
  return tuple(int(c) for c in PALETTE[int(label) % len(PALETTE)])


def class_name(label: int, class_names=None) -> str:
  """The display name of `label`: `class_names[label]` (a sequence indexed by label, entry 0 the background, or a
  mapping label -> name); "class <label>" when there is no such entry."""
  label = int(label)
  name = None
  if isinstance(class_names, Mapping):
    name = class_names.get(label)
  elif class_names is not None and 0 <= label < len(class_names):
    name = class_names[label]
  return str(name) if name else f"class {label}"


@functools.lru_cache(maxsize=8)
def _font(size: int):
  try:
    return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()  # the fixed-size bitmap font


def _as_uint8_image(image) -> np.ndarray:
  image = transforms.check_image(image, name="image")
  return image if image.dtype == np.uint8 else transforms.to_uint8(image)


def _check_instances(boxes, classes, scores, masks, keypoints, image_hw):
  """Validate the per-instance arrays against each other and the image; errors name the argument."""
  boxes = np.asarray(boxes, np.float32)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"boxes must be an (n, 4) XYXY array, got shape {boxes.shape}")
  n = boxes.shape[0]
  classes = np.asarray(classes)
  if classes.shape != (n,):
    raise ValueError(f"classes must have shape ({n},) to match boxes, got shape {classes.shape}")
  if n and not np.issubdtype(classes.dtype, np.integer):
    raise TypeError(f"classes must be integer labels, got dtype {classes.dtype}")
  classes = classes.astype(np.int64)
  if scores is not None:
    scores = np.asarray(scores, np.float32)
    if scores.shape != (n,):
      raise ValueError(f"scores must have shape ({n},) to match boxes, got shape {scores.shape}")
  if masks is not None:
    masks = np.asarray(masks)
    if masks.shape != (n,) + tuple(image_hw):
      raise ValueError(f"masks must have shape (n, H, W) = {(n,) + tuple(image_hw)} to match boxes and the image, "
                       f"got shape {masks.shape}")
    if masks.dtype != bool:
      # Probabilities threshold at 0.5, as the Predictor pastes them; integer masks are 0 / nonzero.
      masks = masks >= 0.5 if np.issubdtype(masks.dtype, np.floating) else masks != 0
  if keypoints is not None:
    keypoints = np.asarray(keypoints, np.float32)
    if keypoints.ndim != 3 or keypoints.shape[0] != n or keypoints.shape[2] != 3:
      raise ValueError(f"keypoints must have shape (n, K, 3) = ({n}, K, 3) with (x, y, score) rows, got shape "
                       f"{keypoints.shape}")
  return boxes, classes, scores, masks, keypoints


def _mask_boundary(mask: np.ndarray) -> np.ndarray:
  """(H, W) bool -> the mask's pixels with a 4-neighbour outside it (the image border counts as outside)."""
  interior = mask.copy()
  interior[1:] &= mask[:-1]
  interior[:-1] &= mask[1:]
  interior[:, 1:] &= mask[:, :-1]
  interior[:, :-1] &= mask[:, 1:]
  interior[0, :] = interior[-1, :] = False
  interior[:, 0] = interior[:, -1] = False
  return mask & ~interior


def _pixel_box(box: np.ndarray, image_hw) -> tuple[int, int, int, int] | None:
  """XYXY continuous box -> inclusive pixel corners (x1, y1, x2, y2) of the pixels it covers, clipped to the image;
  None when nothing of it is inside."""
  h, w = image_hw
  if not np.all(np.isfinite(box)):
    return None
  x1, y1 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
  x2, y2 = min(int(np.ceil(box[2])) - 1, w - 1), min(int(np.ceil(box[3])) - 1, h - 1)
  if x2 < x1 or y2 < y1:
    return None
  return x1, y1, x2, y2


def _text_color(color) -> tuple[int, int, int]:
  """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
  luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
  return (0, 0, 0) if luma > 140 else (255, 255, 255)


def draw_instances(image, boxes, classes, scores=None, masks=None, keypoints=None, class_names=None, *,
                   score_threshold: float = 0.0, keypoint_skeleton=None, alpha: float = 0.5,
                   keypoint_threshold: float = DEFAULT_KEYPOINT_THRESHOLD) -> np.ndarray:
  """Draw detections (or ground truth) over an image.

  Each instance gets its class colour (`class_color`): its mask is blended in with `alpha` and outlined (1 px, the
  mask's boundary pixels in the full colour), its box outlined, a label "name 97%" drawn on a colour tab at the box's
  top-left corner (above the box when there is room), and its keypoints drawn as dots joined by skeleton lines.
  Larger instances are drawn first, so that small ones stay visible on top.

  Args:
    image: (H, W, 3) RGB, uint8 or float in [0, 1]. Not modified.
    boxes: (n, 4) XYXY in absolute pixels of `image`.
    classes: (n,) integer labels.
    scores: (n,) in [0, 1], or None (labels without a percentage, e.g. ground truth).
    masks: (n, H, W) bool (float probabilities are thresholded at 0.5, integers at nonzero), or None.
    keypoints: (n, K, 3) (x, y, score) in pixels of `image`, or None. A keypoint is drawn when its score is above
      `keypoint_threshold`.
    class_names: a sequence indexed by label (entry 0 the background) or a mapping label -> name; labels without a
      name are written "class <label>".
    score_threshold: instances with a score below it are not drawn (ignored when scores is None).
    keypoint_skeleton: (i, j) pairs of 0-based keypoint indices to join with lines; None joins COCO's person
      skeleton when K == 17 and nothing otherwise; () joins nothing.
    alpha: mask opacity in [0, 1].
    keypoint_threshold: minimum keypoint score (exclusive) for a keypoint to be drawn.

  Returns:
    (H, W, 3) uint8, a new array.

  Raises:
    ValueError / TypeError naming the argument whose shape or dtype is wrong.
  """
  image = _as_uint8_image(image)
  h, w = image.shape[:2]
  boxes, classes, scores, masks, keypoints = _check_instances(boxes, classes, scores, masks, keypoints, (h, w))
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  keypoint_skeleton = _check_skeleton(keypoint_skeleton, keypoints)
  order = _drawing_order(boxes, scores, masks, score_threshold)
  colors = {int(i): class_color(classes[i]) for i in order}

  out = _blend_masks(image, masks, order, colors, alpha)
  draw = ImageDraw.Draw(out)
  line_width = max(1, round(max(h, w) / 400))
  for i in order:
    box = _pixel_box(boxes[i], (h, w))
    if box is not None:
      draw.rectangle(box, outline=colors[int(i)], width=line_width)
  if keypoints is not None:
    _draw_keypoints(draw, keypoints, order, colors, keypoint_skeleton, keypoint_threshold, line_width)
  # Labels last, on top of everything.
  font = _font(max(10, min(h, w) // 40))
  for i in order:
    box = _pixel_box(boxes[i], (h, w))
    if box is not None:
      text = class_name(classes[i], class_names) + ("" if scores is None else f" {100 * float(scores[i]):.0f}%")
      _draw_label(draw, box, text, colors[int(i)], font)
  return np.asarray(out, np.uint8).copy()


def _check_skeleton(keypoint_skeleton, keypoints) -> list[tuple[int, int]] | None:
  """The (i, j) pairs to join: COCO's person skeleton for 17 keypoints when None is given, nothing for other counts.
  Raises ValueError naming the pairs that are not pairs of the K keypoints."""
  if keypoints is not None and keypoint_skeleton is None:
    keypoint_skeleton = COCO_PERSON_SKELETON if keypoints.shape[1] == NUM_COCO_KEYPOINTS else ()
  if keypoint_skeleton is None:
    return None
  keypoint_skeleton = [(int(i), int(j)) for i, j in keypoint_skeleton]
  if keypoints is not None:
    k = keypoints.shape[1]
    bad = [(i, j) for i, j in keypoint_skeleton if not (0 <= i < k and 0 <= j < k)]
    if bad:
      raise ValueError(f"keypoint_skeleton has pairs {bad} outside the {k} keypoints")
  return keypoint_skeleton


def _drawing_order(boxes: np.ndarray, scores, masks, score_threshold: float) -> np.ndarray:
  """Indices of the instances to draw (score >= score_threshold), larger first (mask area, else box area), so that
  small instances end up on top; ties keep their input order."""
  keep = np.arange(len(boxes))
  if scores is not None:
    keep = keep[scores >= score_threshold]
  if masks is not None:
    areas = masks[keep].sum(axis=(1, 2))
  else:
    areas = np.prod(np.clip(boxes[keep, 2:] - boxes[keep, :2], 0, None), axis=1)
  return keep[np.argsort(-areas, kind="stable")]


def _blend_masks(image: np.ndarray, masks, order: np.ndarray, colors: dict, alpha: float) -> Image.Image:
  """A new PIL image of `image` with the masks of `order` blended in with `alpha` and outlined in their colours."""
  if masks is None or not len(order):
    return Image.fromarray(image.copy())
  # In float, so that overlapping instances blend in drawing order.
  canvas = image.astype(np.float32)
  for i in order:
    color = np.asarray(colors[int(i)], np.float32)
    canvas[masks[i]] = (1.0 - alpha) * canvas[masks[i]] + alpha * color
    canvas[_mask_boundary(masks[i])] = color
  return Image.fromarray(np.rint(canvas).astype(np.uint8))


def _draw_keypoints(draw: ImageDraw.ImageDraw, keypoints: np.ndarray, order: np.ndarray, colors: dict, skeleton,
                    threshold: float, line_width: int) -> None:
  """Each instance's keypoints scored above `threshold`: skeleton lines in its colour, then a dot per keypoint."""
  radius = line_width + 1
  for i in order:
    points = keypoints[i]
    shown = np.isfinite(points).all(axis=1) & (points[:, 2] > threshold)
    for a, b in skeleton:
      if shown[a] and shown[b]:
        draw.line([tuple(points[a, :2]), tuple(points[b, :2])], fill=colors[int(i)], width=line_width)
    for k in np.flatnonzero(shown):
      x, y = points[k, :2]
      # A colour per keypoint index, so that left and right joints are told apart.
      draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=class_color(k + 1), outline=(0, 0, 0))


def _draw_label(draw: ImageDraw.ImageDraw, box, text: str, color, font) -> None:
  """`text` on a tab of `color` at the top-left corner of `box`: above it, or inside its top edge when it touches
  the top of the image."""
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  tw, th = right - left + 2, bottom - top + 2
  x, y = box[0], box[1] - th
  if y < 0:
    y = box[1]
  draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=color)
  draw.text((x + 1 - left, y + 1 - top), text, fill=_text_color(color), font=font)


def make_grid(images: Sequence[np.ndarray], cols: int, *, padding: int = 2, fill=(255, 255, 255)) -> np.ndarray:
  """Tile images row by row into one picture.

  Args:
    images: a non-empty list of (H_i, W_i, 3) RGB images, uint8 or float in [0, 1]; sizes may differ (each sits at
      the top-left of a cell of the largest height and width).
    cols: images per row (rows = ceil(len(images) / cols)).
    padding: pixels of `fill` between cells and around the grid.
    fill: RGB uint8 colour of the padding and of the unused parts of cells.

  Returns:
    (rows * (H + padding) + padding, cols * (W + padding) + padding, 3) uint8, with H, W the largest image sizes.
  """
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  if not len(images):
    raise ValueError("images must be a non-empty list of (H, W, 3) arrays")
  if int(cols) < 1:
    raise ValueError(f"cols must be >= 1, got {cols}")
  if int(padding) < 0:
    raise ValueError(f"padding must be >= 0, got {padding}")
  tiles = []
  for i, image in enumerate(images):
    image = transforms.check_image(image, name=f"images[{i}]")
    tiles.append(image if image.dtype == np.uint8 else transforms.to_uint8(image))
  cols, padding = min(int(cols), len(tiles)), int(padding)
  rows = -(-len(tiles) // cols)
  cell_h = max(t.shape[0] for t in tiles)
  cell_w = max(t.shape[1] for t in tiles)
  grid = np.empty((rows * (cell_h + padding) + padding, cols * (cell_w + padding) + padding, 3), np.uint8)
  grid[...] = np.asarray(fill, np.uint8)
  for i, tile in enumerate(tiles):
    y = padding + (i // cols) * (cell_h + padding)
    x = padding + (i % cols) * (cell_w + padding)
    grid[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
  return grid


def save_image(path, image) -> pathlib.Path:
  """Write an (H, W, 3) RGB image (uint8 or float in [0, 1]) to `path`, in the format its suffix names.

  Atomic: the file is written under a temporary name in the same directory and renamed over `path`, so a reader
  never sees a half-written image and an interrupted write leaves any previous file as it was. Returns the path.
  """
  path = pathlib.Path(path)
  image = _as_uint8_image(image)
  extension = path.suffix.lower()
  image_format = Image.registered_extensions().get(extension)
  if image_format is None:
    raise ValueError(f"save_image: cannot tell the image format of {path} from its suffix {extension!r}")
  atomic.write_file(path, lambda f: Image.fromarray(image).save(f, format=image_format), binary=True)
  return path
