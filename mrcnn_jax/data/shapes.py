"""The built-in synthetic dataset: coloured circles, squares and triangles over textured backgrounds, as COCO.

Each image holds 1-8 shapes of random class, colour, size, rotation and position, drawn one after another so that later
shapes occlude earlier ones; an instance's mask is its visible part. The set is written as PNG files plus COCO JSON
(compressed RLE masks), so training on it runs through the same COCO path as real data:

  out_dir/
    train/000001.png ...          images of the train split (file_name in the JSON is relative to this folder)
    val/000001.png ...
    annotations/instances_train.json, annotations/instances_val.json
    manifest.json                 the generation parameters; written last, its presence marks a complete set

The task is meant to be learnable by a small Mask R-CNN in minutes on a CPU: shapes are 16-48 px at 128x128 (scaled
with the image), saturated and bright over dim, greyish textures, never more than 40% hidden, and shapes that touch get
distinct hues. Masks are drawn without anti-aliasing and the image is painted from the same masks, so every annotated
pixel is exactly the pixel that shows the shape.

Determinism: image i of a split is drawn from `np.random.default_rng([seed, split_id, i])` alone, so a seed gives the
same bytes every time and the val split does not depend on how many train images there are.
"""

from __future__ import annotations

import colorsys
import json
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn_jax import atomic

CLASSES = ("circle", "square", "triangle")  # category id = index + 1

# Bump when the drawing changes, so that `ensure_dataset` regenerates sets written by an older generator.
GENERATOR_VERSION = 1
MANIFEST = "manifest.json"
SPLIT_IDS = {"train": 0, "val": 1}

MAX_INSTANCES = 8
# Shape extent in pixels at 128x128 (circle diameter; a square's side is 0.85x, a triangle's 1.1x, which gives the
# three classes similar areas). Below ~16 px a 28x28 mask head has little to learn from and mask AP falls.
SIZE_RANGE = (16.0, 48.0)
REFERENCE_SIDE = 128.0
MIN_SIDE = 64
# A shape may be hidden by later shapes up to this fraction of its in-image area: occlusion stays moderate, so a
# visible part still shows the class.
MAX_OCCLUDED_FRACTION = 0.4
# Smallest visible area (pixels) of an annotation; smaller instances are never drawn, so no shape goes unannotated.
MIN_VISIBLE_AREA = 20
PLACEMENT_TRIES = 10
# Shapes whose boxes come this close get hues at least MIN_HUE_DISTANCE apart (hue in [0, 1)), so that their
# common edge is visible.
NEIGHBOUR_MARGIN = 2
MIN_HUE_DISTANCE = 0.15
PIXEL_NOISE_STD = 3.0


# --------------------------------------------------------------------------------------------------------------------
# Drawing.
# --------------------------------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255.0


def background(rng: np.random.Generator, size_hw: tuple[int, int]) -> np.ndarray:
  """A dim, low-saturation texture. -> (H, W, 3) float32 in [0, 255].

  Either smooth noise (a coarse random grid upsampled bicubically) or soft stripes at a random angle, blended
  between two greyish colours; the contrast with the shapes comes from their brightness and saturation, so hue is free.
  """
  h, w = size_hw
  if rng.random() < 0.5:
    cells = int(rng.integers(3, 9))
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    t = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32) / 255.0
  else:
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(8, 32) * min(h, w) / REFERENCE_SIDE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
    t = 0.5 + 0.5 * np.sin(phase + rng.uniform(0, 2 * np.pi))
  c0 = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.08, 0.3))
  c1 = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.5))
  return c0 + t[..., None] * (c1 - c0)


def _shape_mask(category: str, center: tuple[float, float], size: float, angle: float,
                size_hw: tuple[int, int]) -> np.ndarray:
  """A filled shape, sampled at pixel centres (no anti-aliasing). -> (H, W) bool; the part outside is cut off.

  center: (cx, cy) in pixels; size: the shape's extent (circle diameter); angle: rotation in radians.
  """
  h, w = size_hw
  cx, cy = center
  mask = np.zeros((h, w), bool)
  # Evaluate only inside the shape's bounding square (the circumradius bounds all three classes).
  reach = 0.75 * size
  x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, w)
  y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, h)
  if x0 >= x1 or y0 >= y1:
    return mask
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
  px, py = xx + 0.5 - cx, yy + 0.5 - cy
  if category == "circle":
    inside = px * px + py * py <= (0.5 * size) ** 2
  else:
    if category == "square":
      radius, corners = 0.85 * size / np.sqrt(2.0), 4
    elif category == "triangle":
      radius, corners = 1.1 * size / np.sqrt(3.0), 3
    else:
      raise ValueError(f"unknown shape class {category!r}")
    theta = angle + 2 * np.pi * np.arange(corners) / corners
    vx, vy = radius * np.cos(theta), radius * np.sin(theta)
    # A convex polygon with counter-clockwise vertices: inside = left of (or on) every edge.
    inside = np.ones(px.shape, bool)
    for k in range(corners):
      ax, ay = vx[k], vy[k]
      bx, by = vx[(k + 1) % corners], vy[(k + 1) % corners]
      inside &= (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0
  mask[y0:y1, x0:x1] = inside
  return mask


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
  """Tight box of a non-empty mask as inclusive pixel bounds (x0, y0, x1, y1)."""
  ys = np.flatnonzero(mask.any(axis=1))
  xs = np.flatnonzero(mask.any(axis=0))
  return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def _hue_distance(a: float, b: float) -> float:
  d = abs(a - b) % 1.0
  return min(d, 1.0 - d)


def _pick_hue(rng: np.random.Generator, neighbour_hues: Sequence[float]) -> float:
  """A random hue at least MIN_HUE_DISTANCE from the neighbours' if one is found in a few tries, else the farthest."""
  best, best_distance = 0.0, -1.0
  for _ in range(PLACEMENT_TRIES):
    hue = float(rng.random())
    distance = min((_hue_distance(hue, n) for n in neighbour_hues), default=1.0)
    if distance >= MIN_HUE_DISTANCE:
      return hue
    if distance > best_distance:
      best, best_distance = hue, distance
  return best


def make_image(rng: np.random.Generator, size_hw: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, list[dict]]:
  """Draw one image and its instances.

  rng: the image's own generator (everything is drawn from it). size_hw: (H, W), each side at least MIN_SIDE.
  Returns (image, instances): image (H, W, 3) uint8 RGB; instances in drawing order (later ones on top), 1 to
  MAX_INSTANCES dicts with
    category_id: int in 1..len(CLASSES) (CLASSES[category_id - 1] is its name),
    mask: (H, W) bool, the visible part (later shapes subtracted), at least MIN_VISIBLE_AREA pixels,
    bbox: [x, y, w, h] floats, the tight box of `mask` in COCO's XYWH (w = last column - first column + 1),
    area: int, mask pixels,
    color: (r, g, b) ints, the shape's fill colour.
  """
  h, w = size_hw
  if min(h, w) < MIN_SIDE:
    raise ValueError(f"shapes images need sides of at least {MIN_SIDE} px, got {size_hw}")
  scale = min(h, w) / REFERENCE_SIDE
  canvas = background(rng, size_hw)
  wanted = int(rng.integers(1, MAX_INSTANCES + 1))
  # Per placed shape: category id, hue, colour, in-image area when drawn, and its current visible mask.
  placed: list[dict] = []
  for _ in range(wanted):
    # The first shape always fits somewhere (nothing to occlude yet); more tries make sure no image comes out empty.
    for _ in range(PLACEMENT_TRIES if placed else 20 * PLACEMENT_TRIES):
      category_id = int(rng.integers(1, len(CLASSES) + 1))
      size = float(rng.uniform(*SIZE_RANGE)) * scale
      # The centre stays at least a quarter of the extent inside each border: shapes may leave the image a little.
      margin = 0.25 * size
      center = (float(rng.uniform(margin, w - margin)), float(rng.uniform(margin, h - margin)))
      angle = float(rng.uniform(0, 2 * np.pi))
      mask = _shape_mask(CLASSES[category_id - 1], center, size, angle, size_hw)
      area = int(mask.sum())
      if area < MIN_VISIBLE_AREA:
        continue
      # Rejected if it would hide too much of an earlier shape (which would then show too little of its class).
      if any(int((p["mask"] & ~mask).sum()) < max((1 - MAX_OCCLUDED_FRACTION) * p["full_area"], MIN_VISIBLE_AREA)
             for p in placed):
        continue
      break
    else:
      continue  # no room found for this one: the image has fewer shapes
    x0, y0, x1, y1 = _mask_box(mask)
    m = NEIGHBOUR_MARGIN
    neighbour_hues = [p["hue"] for p in placed if p["box"][0] - m <= x1 and x0 <= p["box"][2] + m
                      and p["box"][1] - m <= y1 and y0 <= p["box"][3] + m]
    hue = _pick_hue(rng, neighbour_hues)
    color = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0))
    canvas[mask] = color
    for p in placed:
      p["mask"] &= ~mask
    placed.append(dict(category_id=category_id, hue=hue, color=color, full_area=area, mask=mask,
                       box=(x0, y0, x1, y1)))

  # Sensor-like noise over everything, so that flat colour alone is not the cue.
  canvas += rng.normal(0.0, PIXEL_NOISE_STD, canvas.shape).astype(np.float32)
  image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

  if not placed:
    raise RuntimeError(f"no shape could be placed in a {size_hw} image")  # unreachable for sides >= MIN_SIDE
  instances = []
  for p in placed:
    area = int(p["mask"].sum())
    if area < MIN_VISIBLE_AREA:  # cannot happen given the placement test; kept so no annotation is degenerate
      continue
    x0, y0, x1, y1 = _mask_box(p["mask"])
    instances.append(dict(category_id=p["category_id"], mask=p["mask"],
                          bbox=[float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)], area=area,
                          color=tuple(int(c) for c in np.clip(np.rint(p["color"]), 0, 255))))
  return image, instances


# --------------------------------------------------------------------------------------------------------------------
# Writing the COCO-format set.
# --------------------------------------------------------------------------------------------------------------------


def encode_rle(mask: np.ndarray) -> dict:
  """(H, W) bool -> COCO compressed RLE {"size": [H, W], "counts": str} (JSON-ready)."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_split(root: pathlib.Path, split: str, num_images: int, seed: int, size_hw: tuple[int, int]) -> dict:
  """Write root/<split>/*.png and return the split's COCO dict (image ids and annotation ids start at 1)."""
  image_dir = root / split
  image_dir.mkdir(parents=True)
  images, annotations = [], []
  for i in range(num_images):
    rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
    image, instances = make_image(rng, size_hw)
    image_id = i + 1
    file_name = f"{image_id:06d}.png"
    # compress_level fixed so the bytes do not depend on PIL's default.
    Image.fromarray(image).save(image_dir / file_name, compress_level=6)
    images.append(dict(id=image_id, file_name=file_name, height=int(size_hw[0]), width=int(size_hw[1])))
    for inst in instances:
      annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=inst["category_id"],
                              bbox=inst["bbox"], area=float(inst["area"]), iscrowd=0,
                              segmentation=encode_rle(inst["mask"])))
  return dict(
      info=dict(description=f"mrcnn_jax synthetic shapes, {split} split", version=str(GENERATOR_VERSION),
                seed=int(seed), size_hw=[int(s) for s in size_hw]),
      licenses=[],
      images=images,
      annotations=annotations,
      categories=[dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(CLASSES)],
  )


def _manifest(num_train: int, num_val: int, seed: int, size_hw: Sequence[int]) -> dict:
  return dict(generator="mrcnn_jax.data.shapes", version=GENERATOR_VERSION, classes=list(CLASSES),
              num_train=int(num_train), num_val=int(num_val), seed=int(seed), size_hw=[int(s) for s in size_hw])


def dataset_paths(out_dir) -> dict[str, pathlib.Path]:
  """Where a set written to out_dir keeps its parts: train_images, val_images (folders), train_annotations,
  val_annotations (COCO JSON files), manifest."""
  out = pathlib.Path(out_dir)
  return dict(train_images=out / "train", val_images=out / "val",
              train_annotations=out / "annotations" / "instances_train.json",
              val_annotations=out / "annotations" / "instances_val.json", manifest=out / MANIFEST)


def _read_manifest(out_dir: pathlib.Path) -> dict | None:
  try:
    return json.loads((out_dir / MANIFEST).read_text())
  except (OSError, ValueError):
    return None


def _is_complete(out_dir: pathlib.Path, manifest: dict) -> bool:
  out_dir = pathlib.Path(out_dir)
  paths = dataset_paths(out_dir)
  return (_read_manifest(out_dir) == manifest and paths["train_annotations"].is_file()
          and paths["val_annotations"].is_file())


def write_dataset(out_dir, num_train: int, num_val: int, seed: int,
                  size_hw: Sequence[int] = (128, 128)) -> dict[str, pathlib.Path]:
  """Generate the set and put it at out_dir atomically; returns `dataset_paths(out_dir)`.

  Everything is written into a temporary folder beside out_dir and renamed into place, so a reader sees a complete
  set or none. An existing out_dir is replaced only if it is a shapes set (it has a manifest); any other existing
  folder raises FileExistsError rather than being deleted.
  """
  out = pathlib.Path(out_dir).absolute()
  size_hw = (int(size_hw[0]), int(size_hw[1]))
  if num_train < 0 or num_val < 0 or seed < 0:
    raise ValueError(f"num_train, num_val and seed must be >= 0, got {num_train}, {num_val}, {seed}")
  if out.exists() and _read_manifest(out) is None and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out} exists and is not a shapes dataset (no {MANIFEST}); not overwriting it")
  manifest = _manifest(num_train, num_val, seed, size_hw)

  def write(tmp: pathlib.Path) -> None:
    (tmp / "annotations").mkdir()
    for split, count in (("train", num_train), ("val", num_val)):
      coco = _write_split(tmp, split, count, seed, size_hw)
      (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

  # A set that another process finished first stays: the generator is deterministic, so theirs equals ours, and a
  # reader may be in it.
  atomic.write_dir(out, write, replace=lambda existing: not _is_complete(existing, manifest))
  return dataset_paths(out)


def has_dataset(out_dir, num_train: int, num_val: int, seed: int, size_hw: Sequence[int] = (128, 128)) -> bool:
  """Whether out_dir holds a complete set with these parameters, written by this generator version."""
  return _is_complete(pathlib.Path(out_dir).absolute(), _manifest(num_train, num_val, seed, size_hw))


def ensure_dataset(out_dir, num_train: int, num_val: int, seed: int,
                   size_hw: Sequence[int] = (128, 128)) -> dict[str, pathlib.Path]:
  """`write_dataset` unless out_dir already holds a complete set with these parameters (and this generator version),
  which is then reused as is. Returns `dataset_paths(out_dir)`."""
  out = pathlib.Path(out_dir).absolute()
  if has_dataset(out, num_train, num_val, seed, size_hw):
    return dataset_paths(out)
  return write_dataset(out, num_train, num_val, seed, size_hw)
