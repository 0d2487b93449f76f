"""From records to device batches: training augmentation, the grain training loader, evaluation batches.

  record + image --train_example--> one example: fixed-shape numpy arrays (canvas image, GT padded to G slots)
  source --make_train_loader--> grain DataLoader: shuffled, grouped by canvas, sharded by process, infinite,
         checkpointable iterator of batches (`BatchPlan` says which images make each global batch)
  source --make_eval_batches--> every image once, grouped by canvas, each group's last batch padded (`valid`)
  batch --to_global_batch--> global jax.Arrays sharded over the mesh's data axis

Canvases: every image is padded to the smallest of the config's static canvases (`input.canvases`) that holds it
(`transforms.train_canvas`, `transforms.eval_canvas`), and a batch holds images of one canvas only, so that each
canvas is one compiled program (jit compiles it the first time it sees that shape, and reuses it).

A "source" is duck-typed: anything with `.records` (a list of `records.ImageRecord`) and `.load_image(record)`
returning (H, W, 3) uint8 RGB, raising FileNotFoundError / ValueError (or another OSError) naming the file for a
missing or corrupt image (`coco.CocoSource`, or a test's in-memory fake).

Training examples (`train_example`), all numpy, G = input_cfg.max_instances, M = input_cfg.gt_mask_size, K keypoints:
  image (Hc, Wc, 3) float32       the normalized resized (and maybe flipped) image at the top left of its canvas,
                                  zeros elsewhere
  image_info (6,) float32         [valid_h, valid_w, scale_h, scale_w, orig_h, orig_w], as `transforms.preprocess`
  gt_boxes (G, 4) float32         XYXY in resized-image pixels; zeros in unused slots
  gt_classes (G,) int32           contiguous labels 1..num_classes; 0 in unused slots
  gt_valid (G,) bool              which slots hold an instance
  gt_is_crowd (G,) bool           crowd instances (kept for matching to ignore, never as targets)
  gt_masks (G, M, M) uint8        each instance's mask cropped to its own box, 0..255 coverage (DESIGN.md)
  gt_keypoints (G, K, 3) float32  (x, y, visibility) in resized-image pixels; x = y = 0 where visibility is 0
  image_id () int64, num_dropped () int32 (instances beyond G left out)
and the training loader adds num_skipped () int32 (unreadable images replaced to make this example). Batches stack
these along a new leading axis B.

Nothing here except `to_global_batch` touches JAX.
"""

from __future__ import annotations

import sys
import warnings
import zlib
from collections.abc import Iterator, Sequence

import grain.python as grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from pycocotools import mask as mask_utils

from mrcnn_jax.data import transforms
from mrcnn_jax.data.records import ImageRecord
from mrcnn_jax.ops.masks import crop_masks_to_boxes

# Keypoints per instance when the config does not say (COCO person keypoints).
DEFAULT_NUM_KEYPOINTS = 17

# A training example gives up after this many unreadable images in a row: past a few, the image directory is wrong
# rather than a file bad, and looping over the whole dataset would only hide that.
MAX_CONSECUTIVE_SKIPS = 10

# Full-image masks decoded at once while cropping; bounds the host memory of an image with many instances to
# this many H x W bitmaps.
_MASK_DECODE_CHUNK = 16

# Errors of `source.load_image` that mean "this image file is unusable" (FileNotFoundError is an OSError, so is
# PIL's UnidentifiedImageError). Anything else is a bug and propagates.
_IMAGE_ERRORS = (OSError, ValueError)


class SkippedImageWarning(UserWarning):
  """A training image could not be read and another one took its place."""


# --------------------------------------------------------------------------------------------------------------------
# One training example.
# --------------------------------------------------------------------------------------------------------------------


def _num_keypoints(input_cfg) -> int:
  return int(getattr(input_cfg, "num_keypoints", None) or DEFAULT_NUM_KEYPOINTS)


def _keypoint_flip_permutation(flip_map: Sequence[Sequence[int]], num_keypoints: int) -> np.ndarray:
  """(K,) int64: after a horizontal flip, keypoint j is the flipped keypoint perm[j] (left and right swap)."""
  perm = np.arange(num_keypoints)
  for a, b in flip_map or ():
    if not (0 <= a < num_keypoints and 0 <= b < num_keypoints):
      raise ValueError(f"keypoint_flip_map pair ({a}, {b}) is outside 0..{num_keypoints - 1}")
    perm[a], perm[b] = b, a
  return perm


def select_instances(boxes: np.ndarray, is_crowd: np.ndarray, max_instances: int) -> np.ndarray:
  """Indices of the instances that fit the G ground-truth slots.

  boxes: (n, 4) float XYXY; is_crowd: (n,) bool; max_instances: G.
  Returns (min(n, G),) int64 indices in increasing (annotation) order: all instances when n <= G, else the G largest
  by box area, non-crowd instances first (crowd boxes only fill slots that are left, since they serve only to be
  ignored in matching).
  """
  n = boxes.shape[0]
  if n <= max_instances:
    return np.arange(n)
  area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
  # lexsort: last key is primary. Crowd after non-crowd, then larger area first; stable for ties.
  order = np.lexsort((-area, is_crowd.astype(bool)))
  return np.sort(order[:max_instances])


def _crop_masks(record: ImageRecord, keep: np.ndarray, size: int) -> np.ndarray:
  """(len(keep), M, M) uint8 crops of the kept instances' masks inside their boxes, in original-image pixels.

  Decodes the RLEs a chunk at a time so that no more than `_MASK_DECODE_CHUNK` full-image bitmaps exist at once;
  only the crops leave this function.
  """
  crops = np.zeros((len(keep), size, size), np.uint8)
  if record.masks is None or len(keep) == 0:
    return crops  # a boxes-only dataset: the mask head must be off
  for start in range(0, len(keep), _MASK_DECODE_CHUNK):
    idx = keep[start : start + _MASK_DECODE_CHUNK]
    bitmaps = mask_utils.decode([record.masks[i] for i in idx])  # (H, W, k) uint8, Fortran order
    if bitmaps.shape[:2] != (record.height, record.width):
      ids = record.annotation_ids[idx].tolist() if record.annotation_ids is not None else idx.tolist()
      raise ValueError(f"image {record.file_name} (id {record.image_id}): masks of annotations {ids} have size "
                       f"{bitmaps.shape[:2]}, the image {record.height}x{record.width}")
    crops[start : start + len(idx)] = crop_masks_to_boxes(np.transpose(bitmaps, (2, 0, 1)), record.boxes[idx], size)
  return crops


def _check_train_image(record: ImageRecord, image) -> np.ndarray:
  """Validated (H, W, 3) image; ValueError naming the file when its size is not the one the annotations use."""
  image = transforms.check_image(image, name=f"image {record.file_name}")
  if image.shape[:2] != (record.height, record.width):
    raise ValueError(f"image {record.file_name} is {image.shape[0]}x{image.shape[1]} (HxW), but its annotations "
                     f"are for {record.height}x{record.width}")
  return image


def transform_train_example(record: ImageRecord, image, input_cfg, *, short_side: int, flip: bool,
                            canvas_hw: Sequence[int] | None = None) -> dict:
  """`train_example` with its two random choices given: the target short side and whether to flip.

  Resizes (shortest edge `short_side`, longest at most input_cfg.max_size_train, sizes by `transforms.output_size`
  in the config's resize_mode), normalizes in the order of `transforms.preprocess` for that mode, flips
  horizontally if `flip`, pads to canvas_hw (default: the image's `transforms.train_canvas`); maps the ground
  truth along. Returns the example dict of the module docstring (without num_skipped).

  Masks are cropped at the original resolution, inside each instance's original box: resizing is a per-axis scale,
  so that region is the one inside the resized box, and cropping before resizing spares a second resampling of a
  binary mask and the resize of full-image bitmaps. A flip of the image flips each crop left to right (RoIAlign's
  sampling is symmetric about the box centre).
  """
  image = _check_train_image(record, image)
  mode = input_cfg.resize_mode
  height, width = image.shape[:2]
  new_h, new_w = transforms.output_size(height, width, int(short_side), input_cfg.max_size_train, mode)
  norm = dict(pixel_format=input_cfg.pixel_format, pixel_scale=input_cfg.pixel_scale,
              pixel_mean=input_cfg.pixel_mean, pixel_std=input_cfg.pixel_std)
  # The framework's own order (see `transforms.preprocess`): rounding makes the two orders differ slightly.
  if mode == "torchvision":
    resized = transforms.resize_image(transforms.normalize_image(image, **norm), (new_h, new_w), mode)
  else:
    resized = transforms.normalize_image(transforms.resize_image(image, (new_h, new_w), mode), **norm)
  if flip:
    resized = resized[:, ::-1]
  if canvas_hw is None:
    canvas_hw = transforms.train_canvas(height, width, input_cfg)
  canvas = transforms.pad_to_canvas(resized, canvas_hw)
  scale_h, scale_w = new_h / height, new_w / width
  info = np.array([new_h, new_w, scale_h, scale_w, height, width], np.float32)

  num_slots = int(input_cfg.max_instances)
  mask_size = int(input_cfg.gt_mask_size)
  num_kp = _num_keypoints(input_cfg)
  boxes = np.asarray(record.boxes, np.float32).reshape(-1, 4)
  is_crowd = np.asarray(record.is_crowd, bool).reshape(-1)
  keep = select_instances(boxes, is_crowd, num_slots)
  k = len(keep)

  kept = boxes[keep].astype(np.float64) * np.array([scale_w, scale_h, scale_w, scale_h])
  if flip:
    kept = np.stack([new_w - kept[:, 2], kept[:, 1], new_w - kept[:, 0], kept[:, 3]], axis=1)
  crops = _crop_masks(record, keep, mask_size)
  if flip:
    crops = crops[:, :, ::-1]

  gt_keypoints = np.zeros((num_slots, num_kp, 3), np.float32)
  if record.keypoints is not None and k:
    kp = np.asarray(record.keypoints, np.float64)
    if kp.ndim != 3 or kp.shape[1:] != (num_kp, 3):
      raise ValueError(f"image {record.file_name} (id {record.image_id}): keypoints have shape {kp.shape}, "
                       f"expected (n, {num_kp}, 3) (input_cfg.num_keypoints)")
    kp = kp[keep].copy()
    kp[..., 0] *= scale_w
    kp[..., 1] *= scale_h
    # Detectron2's `transform_keypoint_annotations`: a keypoint outside the image is unlabeled.
    inside = (kp[..., 0] >= 0) & (kp[..., 0] <= new_w) & (kp[..., 1] >= 0) & (kp[..., 1] <= new_h)
    kp[..., 2] = np.where(inside, kp[..., 2], 0)
    if flip:
      kp[..., 0] = new_w - kp[..., 0]
      kp = kp[:, _keypoint_flip_permutation(input_cfg.keypoint_flip_map, num_kp)]
    kp[kp[..., 2] == 0] = 0  # COCO convention: unlabeled keypoints sit at (0, 0)
    gt_keypoints[:k] = kp

  gt_boxes = np.zeros((num_slots, 4), np.float32)
  gt_boxes[:k] = kept
  gt_classes = np.zeros((num_slots,), np.int32)
  gt_classes[:k] = np.asarray(record.classes).reshape(-1)[keep]
  gt_valid = np.zeros((num_slots,), bool)
  gt_valid[:k] = True
  gt_is_crowd = np.zeros((num_slots,), bool)
  gt_is_crowd[:k] = is_crowd[keep]
  gt_masks = np.zeros((num_slots, mask_size, mask_size), np.uint8)
  gt_masks[:k] = crops
  return {
      "image": canvas,
      "image_info": info,
      "gt_boxes": gt_boxes,
      "gt_classes": gt_classes,
      "gt_valid": gt_valid,
      "gt_is_crowd": gt_is_crowd,
      "gt_masks": gt_masks,
      "gt_keypoints": gt_keypoints,
      "image_id": np.asarray(record.image_id, np.int64),
      "num_dropped": np.asarray(record.num_instances - k, np.int32),
  }


def train_example(record: ImageRecord, image, input_cfg, rng: np.random.Generator,
                  canvas_hw: Sequence[int] | None = None) -> dict:
  """One training example: random short side and horizontal flip, then `transform_train_example`.

  record: the image's annotations (original pixels). image: (H, W, 3) uint8 RGB (or float in [0, 1]) of size
    (record.height, record.width); another size raises ValueError naming the file.
  input_cfg: config.input (resize_mode, min_size_train, max_size_train, canvases, max_instances, gt_mask_size,
    keypoint_flip_map, pixel_format/scale/mean/std; optional num_keypoints, default 17).
  canvas_hw: the canvas to pad to; default the image's `transforms.train_canvas`.
  rng: draws, in this order, the short side (uniformly from min_size_train, Detectron2's "choice" style) and the
    flip (probability 0.5).
  Returns the example dict of the module docstring; the instances beyond G (the smallest, crowd ones first, see
  `select_instances`) are left out and counted in num_dropped.
  """
  sizes = np.atleast_1d(np.asarray(input_cfg.min_size_train, np.int64))
  short_side = int(sizes[rng.integers(len(sizes))])
  flip = bool(rng.random() < 0.5)
  return transform_train_example(record, image, input_cfg, short_side=short_side, flip=flip, canvas_hw=canvas_hw)


def eval_example(record: ImageRecord, image, input_cfg, canvas_hw: Sequence[int] | None = None) -> dict:
  """One evaluation input: `transforms.preprocess` (min_size_test / max_size_test) and the image id.

  canvas_hw: the canvas to pad to; default the image's `transforms.eval_canvas`.
  Returns {"image": (Hc, Wc, 3) float32, "image_info": (6,) float32, "image_id": () int64}.
  """
  canvas, info = transforms.preprocess(image, input_cfg, canvas_hw)
  return {"image": canvas, "image_info": info, "image_id": np.asarray(record.image_id, np.int64)}


# --------------------------------------------------------------------------------------------------------------------
# The training loader (grain).
# --------------------------------------------------------------------------------------------------------------------


def record_canvases(records: Sequence[ImageRecord], input_cfg, *, train: bool) -> tuple[list, np.ndarray]:
  """(canvases, index): the config's canvases and, per record, the index of the one it is padded to
  (`transforms.train_canvas` or `transforms.eval_canvas`), from the records' sizes alone (no image is read).

  Raises ValueError naming the images (the first 5, and the count) that fit none of the canvases.
  """
  canvas_list = transforms.canvases(input_cfg)
  position = {hw: i for i, hw in enumerate(canvas_list)}
  choose = transforms.train_canvas if train else transforms.eval_canvas
  index, misfits = np.zeros(len(records), np.int32), []
  for i, record in enumerate(records):
    try:
      index[i] = position[choose(record.height, record.width, input_cfg)]
    except ValueError as e:
      misfits.append(f"{record.file_name} ({record.height}x{record.width}): {e}")
  if misfits:
    raise ValueError(f"{len(misfits)} images fit none of the canvases; raise input.canvases or lower the resize "
                     f"sizes: " + "; ".join(misfits[:5]) + ("; ..." if len(misfits) > 5 else ""))
  return canvas_list, index


class BatchPlan:
  """Which records make each global training batch, and its canvas: deterministic, the same on every process.

  Epoch e visits every record once, in the order of a permutation drawn from (seed, e). Each record goes into the
  queue of its canvas, and a global batch is emitted whenever a queue holds global_batch_size records (Detectron2's
  AspectRatioGroupedDataset over an infinite sampler, grouped by canvas rather than by orientation); the queues carry
  over from one epoch to the next. Every process computes the same plan from the records' sizes, so all agree on
  each step's canvas; process p takes slots [p * B_local, (p + 1) * B_local) of each batch.

  `plan[j]` -> (canvas index, record indices (global_batch_size,) int64, epochs (global_batch_size,) int64: the
  epoch in which each record was drawn). Epochs are planned lazily, as far as asked.
  """

  def __init__(self, canvas_index: np.ndarray, num_canvases: int, global_batch_size: int, seed: int):
    self._canvas_index = np.asarray(canvas_index, np.int32)
    self._num_canvases = int(num_canvases)
    self._batch = int(global_batch_size)
    self._seed = int(seed)
    self._queues = [[] for _ in range(self._num_canvases)]
    self._batches: list[tuple[int, np.ndarray, np.ndarray]] = []
    self._epoch = 0

  def _plan_epoch(self) -> None:
    order = np.random.default_rng([self._seed, self._epoch]).permutation(len(self._canvas_index))
    for record in order:
      c = int(self._canvas_index[record])
      queue = self._queues[c]
      queue.append((int(record), self._epoch))
      if len(queue) == self._batch:
        members = np.asarray(queue, np.int64)
        self._batches.append((c, members[:, 0], members[:, 1]))
        queue.clear()
    self._epoch += 1

  def __getitem__(self, j: int) -> tuple[int, np.ndarray, np.ndarray]:
    j = int(j)
    while len(self._batches) <= j:
      before = len(self._batches)
      self._plan_epoch()
      if len(self._batches) == before and self._epoch > self._batch:
        raise RuntimeError("no canvas group ever fills a batch")  # cannot happen: some queue fills in B epochs
    return self._batches[j]


class _BatchIndices:
  """grain data source whose element j is the batch index j itself; the batch is built by `TrainBatchTransform`.

  grain checks `repr` of the data source when an iterator state is restored, so it names the plan by content (a
  checksum of the image ids and canvases, the batch size and seed): a restarted run with the same dataset and
  settings restores, another fails loudly.
  """

  def __init__(self, records: Sequence[ImageRecord], canvas_index: np.ndarray, global_batch_size: int, seed: int):
    ids = np.asarray([r.image_id for r in records], np.int64)
    self._fingerprint = zlib.crc32(ids.tobytes() + np.asarray(canvas_index, np.int32).tobytes())
    self._name = f"num_records={len(records)}, batch={global_batch_size}, seed={seed}"

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> int:
    return int(index)

  def __repr__(self) -> str:
    return f"TrainBatchIndices({self._name}, image_ids_crc32={self._fingerprint:08x})"


class _Sequential:
  """grain Sampler: element j of the (infinite) sequence is batch j, in order (the plan does the shuffling)."""

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    return grain.RecordMetadata(index=int(index), record_key=int(index), rng=None)

  def __repr__(self) -> str:
    return "SequentialBatches()"


class TrainBatchTransform(grain.MapTransform):
  """batch index j -> this process's part of global batch j: its records' training examples, stacked.

  Each example's augmentation draws from an rng seeded by (seed, record index, epoch), so it does not depend on
  the process or worker count, and a resumed iterator reproduces it. A missing or corrupt image warns
  (SkippedImageWarning, naming the file) and the next record of the same canvas takes its place (wrapping around);
  the example's num_skipped counts the images passed over. Replacing rather than filtering keeps every batch full
  and on its canvas, and the iterator state (the batch position) restores the exact same batches.
  """

  def __init__(self, source, input_cfg, plan: BatchPlan, canvas_list, canvas_index, seed: int, shard_index: int,
               shard_count: int):
    self._source = source
    self._records = source.records
    self._input_cfg = input_cfg
    self._plan = plan
    self._canvases = canvas_list
    self._canvas_index = np.asarray(canvas_index, np.int32)
    self._seed = int(seed)
    self._shard_index, self._shard_count = int(shard_index), int(shard_count)

  def _example(self, index: int, epoch: int, canvas: int) -> dict:
    skipped = []
    while True:
      record = self._records[index]
      try:
        image = _check_train_image(record, self._source.load_image(record))
        break
      except _IMAGE_ERRORS as e:
        skipped.append(record.file_name)
        warnings.warn(f"skipping training image {record.file_name} (image id {record.image_id}): {e}",
                      SkippedImageWarning, stacklevel=2)
        if len(skipped) >= MAX_CONSECUTIVE_SKIPS:
          raise RuntimeError(f"{len(skipped)} consecutive training images could not be read ({skipped[0]} ... "
                             f"{skipped[-1]}); is the image directory right?") from e
        index = self._next_on_canvas(index, canvas)
    rng = np.random.default_rng([self._seed, index, epoch])
    example = train_example(record, image, self._input_cfg, rng, self._canvases[canvas])
    example["num_skipped"] = np.asarray(len(skipped), np.int32)
    return example

  def _next_on_canvas(self, index: int, canvas: int) -> int:
    n = len(self._records)
    for step in range(1, n + 1):
      candidate = (index + step) % n
      if self._canvas_index[candidate] == canvas:
        return candidate
    return index

  def map(self, element: int) -> dict:
    canvas, members, epochs = self._plan[int(element)]
    local = len(members) // self._shard_count
    part = slice(self._shard_index * local, (self._shard_index + 1) * local)
    examples = [self._example(int(i), int(e), canvas) for i, e in zip(members[part], epochs[part])]
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def _default_grain_profiling_flag() -> None:
  """Let grain read its worker-profiling flag in programs that never parse absl flags (tests, notebooks, scripts
  without absl.app).

  grain 0.2.18 reads --grain_enable_multiprocess_worker_profiling when a multiprocess iterator starts and JAX is
  imported, and absl refuses to read an unparsed flag (google/grain#1355, fixed upstream by reading the default).
  Marking only that flag present, as grain does for its own debug flags in worker processes, keeps its default
  (False) and leaves every other flag, and a later parse of the command line, alone.
  """
  if flags.FLAGS.is_parsed():
    return
  try:
    holder = flags.FLAGS["grain_enable_multiprocess_worker_profiling"]
  except KeyError:  # a grain without the flag
    return
  holder.present = True


def make_train_loader(source, input_cfg, *, global_batch_size: int, seed: int, num_workers: int = 2,
                      shard_options: grain.ShardOptions | None = None,
                      worker_buffer_size: int = 2) -> grain.DataLoader:
  """The training input: an infinite, shuffled, canvas-grouped, process-sharded grain DataLoader of fixed-shape
  batches.

  source: duck-typed, `.records` and `.load_image(record)` (see the module docstring). With num_workers > 0 it is
    pickled into each worker process (grain spawns them), so it should be cheap to pickle.
  input_cfg: config.input (see `train_example`; `canvases` for the grouping).
  global_batch_size: images per step over all processes; each process gets global_batch_size // shard_count.
  seed: in [0, 2**32): the shuffle (a new permutation each epoch, `BatchPlan`) and, with the record index and the
    epoch, each example's augmentation.
  num_workers: worker processes for decoding and augmentation, each building whole batches; 0 runs everything in
    the calling thread.
  shard_options: grain.ShardOptions(shard_index, shard_count) (tests, custom layouts); default one shard per JAX
    process. Shard s takes slots [s * B_local, (s + 1) * B_local) of every global batch.
  worker_buffer_size: batches each worker prepares ahead.

  Returns the loader. `it = iter(loader)` yields dicts of numpy arrays, each example field of the module docstring
  stacked to (B_local, ...), all images of a batch on one canvas, plus num_skipped (B_local,) int32;
  `it.get_state()` (bytes) and `it.set_state(state)` on a fresh iterator of an equal loader (same dataset, canvases,
  seed, batch size and sharding; any worker count) continue with exactly the batches the first would have produced.
  Raises ValueError naming the images that fit none of the canvases.
  """
  num_records = len(source.records)
  if num_records == 0:
    raise ValueError("the training source has no records")
  if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if shard_options is None:
    shard_options = grain.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count())
  shard_count = shard_options.shard_count
  if global_batch_size <= 0 or global_batch_size % shard_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the number of "
                     f"processes (shards) {shard_count}")
  canvas_list, canvas_index = record_canvases(source.records, input_cfg, train=True)
  plan = BatchPlan(canvas_index, len(canvas_list), global_batch_size, int(seed))
  if num_workers:
    _default_grain_profiling_flag()
  transform = TrainBatchTransform(source, input_cfg, plan, canvas_list, canvas_index, int(seed),
                                  shard_options.shard_index, shard_count)
  return grain.DataLoader(
      data_source=_BatchIndices(source.records, canvas_index, global_batch_size, int(seed)),
      sampler=_Sequential(),
      operations=[transform],
      worker_count=num_workers,
      worker_buffer_size=worker_buffer_size,
      # Each element is a whole global batch's index, and the transform takes this process's slots of it.
      shard_options=grain.NoSharding(),
      # The data source holds integers: reader threads would only contend for the GIL (grain's advice for
      # in-memory sources). Decoding happens in the transform, in parallel across worker processes.
      read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
  )


# --------------------------------------------------------------------------------------------------------------------
# Evaluation batches.
# --------------------------------------------------------------------------------------------------------------------


def make_eval_batches(source, input_cfg, batch_size: int, *, shard_index: int = 0,
                      shard_count: int = 1) -> Iterator[dict]:
  """Every record of this shard exactly once, grouped by canvas, in batches of `batch_size`.

  source: duck-typed (see the module docstring). input_cfg: config.input (see `eval_example`).
  The records are grouped by their canvas (`transforms.eval_canvas`; groups in the order of input.canvases, records
  in source order within a group). shard_index, shard_count: this process takes records shard_index,
  shard_index + shard_count, ... of each group; every shard yields the same sequence of canvases and batch counts
  (per group ceil(ceil(N_c / shard_count) / batch_size)), as global arrays need.
  Yields {"image": (B, Hc, Wc, 3) float32, "image_info": (B, 6) float32, "image_id": (B,) int64, "valid": (B,)
  bool}. Slots past a group's last image of this shard repeat its last real example (finite values for the model)
  with valid False; an empty shard pads with a blank full-canvas image.
  Raises RuntimeError naming the file (chained to the source's error) when an image is missing or unreadable: an
  evaluation that silently drops images reports a wrong AP; ValueError naming the images that fit no canvas.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
  canvas_list, canvas_index = record_canvases(source.records, input_cfg, train=False)
  for c, canvas_hw in enumerate(canvas_list):
    group = [r for r, i in zip(source.records, canvas_index) if i == c]
    if not group:
      continue
    yield from _eval_group_batches(source, group[shard_index::shard_count], -(-len(group) // shard_count),
                                   input_cfg, canvas_hw, batch_size)


def _eval_group_batches(source, records, per_shard: int, input_cfg, canvas_hw, batch_size: int) -> Iterator[dict]:
  """The batches of one canvas group's share of this shard (see `make_eval_batches`)."""
  num_batches = -(-per_shard // batch_size)
  last = None
  for b in range(num_batches):
    examples, valid = [], []
    for record in records[b * batch_size : (b + 1) * batch_size]:
      try:
        image = source.load_image(record)
      except _IMAGE_ERRORS as e:
        raise RuntimeError(f"evaluation image {record.file_name} (image id {record.image_id}) cannot be read: "
                           f"{e}") from e
      last = eval_example(record, image, input_cfg, canvas_hw)
      examples.append(last)
      valid.append(True)
    if last is None:  # this shard has no records of the group
      hc, wc = canvas_hw
      last = {"image": np.zeros((hc, wc, 3), np.float32),
              "image_info": np.array([hc, wc, 1, 1, hc, wc], np.float32),
              "image_id": np.asarray(-1, np.int64)}
    while len(examples) < batch_size:
      examples.append(last)
      valid.append(False)
    batch = {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}
    batch["valid"] = np.asarray(valid, bool)
    yield batch


# --------------------------------------------------------------------------------------------------------------------
# To the devices.
# --------------------------------------------------------------------------------------------------------------------


def to_global_batch(batch: dict, mesh: jax.sharding.Mesh, data_axis: str = "data") -> dict:
  """This process's batch -> global jax.Arrays sharded over `data_axis` of `mesh`.

  batch: dict of numpy arrays with the per-process batch size B_local as their leading dimension.
  Returns a dict with the same keys of jax.Arrays of leading dimension B_local * process_count, sharded
  NamedSharding(mesh, P(data_axis)) (the other dimensions whole on each device). B_local must be a multiple of this
  process's number of devices along `data_axis`. dtypes are JAX's canonical ones: without jax_enable_x64, int64
  (image_id) arrives as int32, so a value outside the int32 range raises ValueError rather than wrapping around.
  """
  sharding = NamedSharding(mesh, P(data_axis))
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    target = jax.dtypes.canonicalize_dtype(value.dtype)
    if target != value.dtype and np.issubdtype(value.dtype, np.integer) and value.size:
      info = np.iinfo(target)
      if value.min() < info.min or value.max() > info.max:
        raise ValueError(f"batch[{key!r}] has values outside {target} (range {value.min()}..{value.max()}); "
                         f"enable jax_enable_x64 or keep it on the host")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
