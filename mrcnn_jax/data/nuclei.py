"""A small one-category synthetic set shaped like a user's own data: the example of the custom-data recipe.

Each 128x128 tile shows 3-15 dark elliptical "nuclei" (category id 7, name "nucleus": deliberately not 1, as in many
real annotation files) over a pale textured background; nuclei do not overlap, so each instance's mask is its whole
ellipse. The layout on disk is a user's: COCO JSON beside two image folders,

  out_dir/train/*.png, out_dir/val/*.png
  out_dir/annotations/train.json, out_dir/annotations/val.json

written atomically and deterministically from the seed (tile i of a split from `default_rng([seed, split, i])`).
Nothing trains on it by default; `configs/custom_coco.py` (README, "Train on your own data") and its end-to-end test
do, as a user's own set would be trained.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

from mrcnn_jax import atomic
from mrcnn_jax.data import shapes

CATEGORY = {"id": 7, "name": "nucleus", "supercategory": "cell"}
SPLIT_IDS = {"train": 0, "val": 1}


def make_tile(rng: np.random.Generator, size: int = 128, max_instances: int = 15) -> tuple[np.ndarray, list]:
  """One (size, size, 3) uint8 tile and its instances' (size, size) bool masks (non-overlapping ellipses)."""
  image = (255.0 - shapes.background(rng, (size, size)) / 2).astype(np.uint8)  # pale, textured
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  taken = np.zeros((size, size), bool)
  masks = []
  for _ in range(int(rng.integers(3, max_instances + 1))):
    for _ in range(shapes.PLACEMENT_TRIES):
      cy, cx = rng.uniform(8, size - 8, 2)
      ry, rx = rng.uniform(4, 11, 2) * size / 128
      angle = rng.uniform(0, np.pi)
      dy, dx = yy - cy, xx - cx
      u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
      v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
      mask = u * u + v * v <= 1.0
      halo = u * u + v * v <= 1.6  # a margin, so that nuclei never touch
      if mask.sum() >= shapes.MIN_VISIBLE_AREA and not (halo & taken).any():
        taken |= halo
        masks.append(mask)
        break
  for mask in masks:
    colour = np.array([110, 60, 140]) + rng.integers(-25, 26, 3)
    shade = rng.normal(0, 10, mask.shape)
    image[mask] = np.clip(colour[None, :] + shade[mask][:, None], 0, 255).astype(np.uint8)
  return image, masks


def _write_split(root: pathlib.Path, split: str, num_images: int, seed: int, size: int, max_instances: int) -> dict:
  (root / split).mkdir()
  images, annotations = [], []
  for i in range(num_images):
    image, masks = make_tile(np.random.default_rng([seed, SPLIT_IDS[split], i]), size, max_instances)
    file_name = f"tile_{i:04d}.png"
    Image.fromarray(image).save(root / split / file_name, compress_level=6)
    image_id = 1000 * (SPLIT_IDS[split] + 1) + i
    images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
    for mask in masks:
      ys, xs = np.nonzero(mask)
      x0, y0 = int(xs.min()), int(ys.min())
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY["id"],
                          "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                          "area": float(mask.sum()), "iscrowd": 0, "segmentation": shapes.encode_rle(mask)})
  return {"images": images, "annotations": annotations, "categories": [dict(CATEGORY)]}


def paths(out_dir) -> dict[str, pathlib.Path]:
  """train_json, train_image_dir, val_json, val_image_dir of a set written to out_dir."""
  out = pathlib.Path(out_dir)
  return {"train_json": out / "annotations" / "train.json", "train_image_dir": out / "train",
          "val_json": out / "annotations" / "val.json", "val_image_dir": out / "val"}


def write_nuclei(out_dir, num_train: int = 33, num_val: int = 4, seed: int = 0, *, size: int = 128,
                 max_instances: int = 15) -> dict[str, pathlib.Path]:
  """Write the set to out_dir (which must not exist, or be empty), atomically; returns `paths(out_dir)`."""
  out = pathlib.Path(out_dir).absolute()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out} exists and is not empty; not overwriting it")

  def write(tmp: pathlib.Path) -> None:
    (tmp / "annotations").mkdir()
    for split, count in (("train", num_train), ("val", num_val)):
      coco = _write_split(tmp, split, count, seed, size, max_instances)
      (tmp / "annotations" / f"{split}.json").write_text(json.dumps(coco))

  atomic.write_dir(out, write, replace=True)
  return paths(out)
