"""A user's own small COCO-format dataset, as the tests of issue 16 ("your own data, first try") need it.

One category whose id is not 1 (id 7, "nucleus"), square tiles of bright discs on a noisy background, up to 15
instances per image: more than the input.max_instances = 8 of the shapes config and the tiny test configs. Written
as PNG files and COCO JSON (compressed RLE masks), like a real dataset:

  root/train/000001.png ..., root/val/000001.png ..., root/annotations/instances_{train,val}.json
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORY_ID = 7
CATEGORY_NAME = "nucleus"
MAX_PER_IMAGE = 15


def _tile(rng: np.random.Generator, size: int, count: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """One (size, size, 3) uint8 image and `count` disjoint disc masks (size, size) bool, on a 4 x 4 grid of cells."""
  cell = size // 4
  yy, xx = np.mgrid[0:size, 0:size]
  image = rng.normal(40, 8, (size, size, 3))
  masks = []
  for index in sorted(rng.choice(16, size=count, replace=False)):
    cy, cx = (index // 4 + 0.5) * cell, (index % 4 + 0.5) * cell
    radius = rng.uniform(0.25, 0.45) * cell
    mask = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius ** 2
    image[mask] = rng.uniform(150, 250, 3)
    masks.append(mask)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), masks


def _split(root: pathlib.Path, split: str, counts, size: int, seed: int) -> pathlib.Path:
  image_dir = root / split
  image_dir.mkdir(parents=True)
  images, annotations = [], []
  for i, count in enumerate(counts):
    rng = np.random.default_rng([seed, len(split), i])
    image, masks = _tile(rng, size, int(count))
    file_name = f"{i + 1:06d}.png"
    Image.fromarray(image).save(image_dir / file_name)
    images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size})
    for mask in masks:
      ys, xs = np.nonzero(mask)
      rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
      annotations.append({
          "id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORY_ID, "iscrowd": 0,
          "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
          "area": float(mask.sum()), "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")}})
  path = root / "annotations" / f"instances_{split}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": [{"id": CATEGORY_ID, "name": CATEGORY_NAME}]}))
  return path


def write(root, train_counts, val_counts=(), *, size: int = 64, seed: int = 0) -> dict[str, pathlib.Path]:
  """Write the set under `root`: one train image per entry of `train_counts` (its number of instances, 1..16), the
  same for val. Returns train_json, train_images, val_json, val_images."""
  root = pathlib.Path(root)
  paths = {"train_json": _split(root, "train", train_counts, size, seed), "train_images": root / "train"}
  if len(val_counts):
    paths.update(val_json=_split(root, "val", val_counts, size, seed), val_images=root / "val")
  return paths


def dataset_overrides(paths: dict) -> dict:
  """The --config.dataset.* values that point a config at the set."""
  out = {"dataset.train_json": str(paths["train_json"]), "dataset.train_image_dir": str(paths["train_images"])}
  if "val_json" in paths:
    out.update({"dataset.val_json": str(paths["val_json"]), "dataset.val_image_dir": str(paths["val_images"])})
  return out
