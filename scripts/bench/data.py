"""The data group: the training loader's throughput and the per-image cost of its steps (no torch side).

  python scripts/benchmark.py data [--json results.json]

grain with 2 workers: batches/s on COCO-like input (synthetic 640x480 images resized to 800x1333 on the 1344x1344
canvas, batch 2) and on the shapes set (128x128, batch 8), and per image the decode, the resize and the whole
train_example (resize, flip, normalize, pad, mask crops). One process.
"""

from __future__ import annotations

import pathlib
import tempfile
import time

import numpy as np

from bench.common import REPO, Row, median_ms


def _bench_loader(name, source, input_cfg, batch_size, num_batches, num_workers) -> list[Row]:
  """Batches per second of the training loader, and the per-image cost of its steps (decode, resize, mask crop)."""
  from mrcnn_jax.data import pipeline, transforms

  loader = pipeline.make_train_loader(source, input_cfg, global_batch_size=batch_size, seed=0,
                                      num_workers=num_workers, shard_options=_single_shard())
  it = iter(loader)
  next(it)  # the workers start (and import their modules) here
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  seconds = time.perf_counter() - start
  del it
  per_batch_ms = 1e3 * seconds / num_batches
  rows = [Row(f"data {name}: loader batch {batch_size}, {num_workers} workers", per_batch_ms, None, 0.0,
              f"{num_batches / seconds:.2f} batches/s = {batch_size * num_batches / seconds:.1f} images/s")]
  # Per-image steps, in this process, over a few records.
  records = source.records[:8]
  images = [source.load_image(r) for r in records]
  rng = np.random.default_rng(0)
  decode = median_ms(lambda: [source.load_image(r) for r in records], 5) / len(records)
  h, w = images[0].shape[:2]
  size = transforms.output_size(h, w, max(input_cfg.min_size_train), input_cfg.max_size_train,
                                input_cfg.resize_mode)
  resize = median_ms(lambda: [transforms.resize_image(im, size, input_cfg.resize_mode) for im in images], 5)
  resize /= len(images)
  example = median_ms(lambda: [pipeline.train_example(r, im, input_cfg, rng) for r, im in zip(records, images)], 5)
  example /= len(records)
  n = sum(r.num_instances for r in records) / len(records)
  rows.append(Row(f"data {name}: per image decode / resize / whole train_example", example, None, 0.0,
                  f"decode {decode:.1f} ms, resize {resize:.1f} ms, train_example {example:.1f} ms "
                  f"(resize, flip, normalize, pad, {n:.1f} mask crops)"))
  return rows


def _single_shard():
  import grain.python as grain

  return grain.ShardOptions(shard_index=0, shard_count=1, drop_remainder=True)


def run(args) -> list[Row]:
  from mrcnn_jax import config_files
  from mrcnn_jax.data import coco, shapes

  config = config_files.load_config(str(REPO / "configs" / "mask_rcnn_R50_FPN_1x.py"))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    # COCO-like: 640x480 images resized to the COCO training sizes on the 1344x1344 canvas.
    paths = shapes.write_dataset(pathlib.Path(tmp) / "coco_like", 48, 0, seed=0, size_hw=(480, 640))
    source = coco.load_coco(paths["train_annotations"], paths["train_images"], train=True)
    rows += _bench_loader("640x480 -> 800x1333 (canvas 1344)", source, config.input, 2, 20, 2)
    # The shapes set at its own size.
    paths = shapes.write_dataset(pathlib.Path(tmp) / "shapes", 256, 0, seed=0)
    source = coco.load_coco(paths["train_annotations"], paths["train_images"], train=True)
    small = config.input
    small.min_size_train, small.max_size_train, small.canvases = (128,), 128, ((128, 128),)
    rows += _bench_loader("shapes 128x128", source, small, 8, 30, 2)
  return rows

