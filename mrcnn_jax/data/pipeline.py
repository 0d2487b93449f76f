"""From records to device batches: training augmentation, the grain training loader, evaluation batches.

  record + image --train_example--> one example: fixed-shape numpy arrays (canvas image, GT padded to G slots)
  source --make_train_loader--> grain DataLoader: shuffled, sharded by process, infinite, checkpointable iterator
  source --make_eval_batches--> every image once, in order, the last batch padded and marked by `valid`
  batch --to_global_batch--> global jax.Arrays sharded over the mesh's data axis

A "source" is duck-typed: anything with `.records` (a list of `records.ImageRecord`) and `.load_image(record)`
returning (H, W, 3) uint8 RGB, raising FileNotFoundError / ValueError (or another OSError) naming the file for a
missing or corrupt image (`coco.CocoSource`, or a test's in-memory fake).

Training examples (`train_example`), all numpy, G = input_cfg.max_instances, M = input_cfg.gt_mask_size, K keypoints:
  image (Hc, Wc, 3) float32       the normalized resized (and maybe flipped) image at the top left, zeros elsewhere
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


def transform_train_example(record: ImageRecord, image, input_cfg, *, short_side: int, flip: bool) -> dict:
  """`train_example` with its two random choices given: the target short side and whether to flip.

  Resizes (shortest edge `short_side`, longest at most input_cfg.max_size_train, sizes by `transforms.output_size`
  in the config's resize_mode), normalizes in the order of `transforms.preprocess` for that mode, flips
  horizontally if `flip`, pads to input_cfg.canvas_hw; maps the ground truth along. Returns the example dict of the
  module docstring (without num_skipped).

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
  canvas = transforms.pad_to_canvas(resized, input_cfg.canvas_hw)
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


def train_example(record: ImageRecord, image, input_cfg, rng: np.random.Generator) -> dict:
  """One training example: random short side and horizontal flip, then `transform_train_example`.

  record: the image's annotations (original pixels). image: (H, W, 3) uint8 RGB (or float in [0, 1]) of size
    (record.height, record.width); another size raises ValueError naming the file.
  input_cfg: config.input (resize_mode, min_size_train, max_size_train, canvas_hw, max_instances, gt_mask_size,
    keypoint_flip_map, pixel_format/scale/mean/std; optional num_keypoints, default 17).
  rng: draws, in this order, the short side (uniformly from min_size_train, Detectron2's "choice" style) and the
    flip (probability 0.5).
  Returns the example dict of the module docstring; the instances beyond G (the smallest, crowd ones first, see
  `select_instances`) are left out and counted in num_dropped.
  """
  sizes = np.atleast_1d(np.asarray(input_cfg.min_size_train, np.int64))
  short_side = int(sizes[rng.integers(len(sizes))])
  flip = bool(rng.random() < 0.5)
  return transform_train_example(record, image, input_cfg, short_side=short_side, flip=flip)


def eval_example(record: ImageRecord, image, input_cfg) -> dict:
  """One evaluation input: `transforms.preprocess` (min_size_test / max_size_test) and the image id.

  Returns {"image": (Hc, Wc, 3) float32, "image_info": (6,) float32, "image_id": () int64}.
  """
  canvas, info = transforms.preprocess(image, input_cfg)
  return {"image": canvas, "image_info": info, "image_id": np.asarray(record.image_id, np.int64)}


# --------------------------------------------------------------------------------------------------------------------
# The training loader (grain).
# --------------------------------------------------------------------------------------------------------------------


class _RecordIndices:
  """grain data source whose element i is the record index i itself.

  The records and the images stay with the transform (which holds the source): grain's reader threads then have
  nothing to read, and each worker process receives the source once. grain checks `repr` of the data source when
  an iterator state is restored, so it names the dataset by content (a checksum of the image ids), not by object
  identity: a restarted run with the same dataset restores, another dataset fails loudly.
  """

  def __init__(self, records: Sequence[ImageRecord]):
    self._num_records = len(records)
    ids = np.asarray([r.image_id for r in records], np.int64)
    self._fingerprint = zlib.crc32(ids.tobytes())

  def __len__(self) -> int:
    return self._num_records

  def __getitem__(self, index: int) -> int:
    return int(index)

  def __repr__(self) -> str:
    return f"RecordIndices(num_records={self._num_records}, image_ids_crc32={self._fingerprint:08x})"


class _EpochSeededSampler:
  """grain's IndexSampler (global shuffle by seed, reshuffled every epoch, infinite), with each example's rng drawn
  from (seed, record index, epoch).

  grain's own per-example rng depends on the position in the sampled sequence; deriving it from the record and the
  epoch instead makes an image's augmentation independent of how the sequence is sharded over processes and
  workers, and a resumed iterator (same positions) reproduces it exactly either way.
  """

  def __init__(self, num_records: int, seed: int):
    self._num_records = num_records
    self._seed = seed
    # Sharding happens in the DataLoader (strided over this global sequence), so each epoch's permutation is split
    # between the processes.
    self._sampler = grain.IndexSampler(num_records, shard_options=grain.NoSharding(), shuffle=True,
                                       num_epochs=None, seed=seed)

  def __len__(self) -> int:
    return len(self._sampler)

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    meta = self._sampler[index]
    epoch = index // self._num_records
    rng = np.random.default_rng([self._seed, int(meta.record_key), epoch])
    return grain.RecordMetadata(index=meta.index, record_key=meta.record_key, rng=rng)

  def __repr__(self) -> str:
    return f"EpochSeededSampler(num_records={self._num_records}, seed={self._seed}, shuffle=True, num_epochs=None)"


class TrainTransform(grain.RandomMapTransform):
  """record index -> training example (`train_example`), replacing an unreadable image by the next record's.

  A missing or corrupt image warns (SkippedImageWarning, naming the file) and the example is made from the next
  record index instead (wrapping around); the example's num_skipped counts the images passed over. Replacing
  rather than filtering keeps the transform stateless and one-to-one: every batch is full, the count travels with
  the batch out of the worker processes, and the iterator state (positions in the sampled sequence) restores the
  exact same batches.
  """

  def __init__(self, source, input_cfg):
    self._source = source
    self._records = source.records
    self._input_cfg = input_cfg

  def random_map(self, element: int, rng: np.random.Generator) -> dict:
    index = int(element)
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
        index = (index + 1) % len(self._records)
    example = train_example(record, image, self._input_cfg, rng)
    example["num_skipped"] = np.asarray(len(skipped), np.int32)
    return example


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
  """The training input: an infinite, shuffled, process-sharded grain DataLoader of fixed-shape batches.

  source: duck-typed, `.records` and `.load_image(record)` (see the module docstring). With num_workers > 0 it is
    pickled into each worker process (grain spawns them), so it should be cheap to pickle.
  input_cfg: config.input (see `train_example`).
  global_batch_size: images per step over all processes; each process gets global_batch_size // shard_count.
  seed: in [0, 2**32): the shuffle (a new permutation each epoch) and, with the record index and the epoch, each
    example's augmentation.
  num_workers: worker processes for decoding and augmentation; 0 runs everything in the calling thread.
  shard_options: grain.ShardOptions(shard_index, shard_count) (tests, custom layouts); default
    grain.ShardByJaxProcess(drop_remainder=True), one shard per JAX process. Shard s reads positions s, s + count,
    ... of the global shuffled sequence, so the shards partition each epoch.
  worker_buffer_size: batches each worker prepares ahead.

  Returns the loader. `it = iter(loader)` yields dicts of numpy arrays, each example field of the module docstring
  stacked to (B, ...), plus num_skipped (B,) int32; `it.get_state()` (bytes) and `it.set_state(state)` on a fresh
  iterator of an equal loader (same dataset, seed, sharding and num_workers; which batch holds which image depends
  on the worker count) continue with exactly the batches the first would have produced.
  """
  num_records = len(source.records)
  if num_records == 0:
    raise ValueError("the training source has no records")
  if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  shard_options = shard_options if shard_options is not None else grain.ShardByJaxProcess(drop_remainder=True)
  shard_count = shard_options.shard_count
  if global_batch_size <= 0 or global_batch_size % shard_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the number of "
                     f"processes (shards) {shard_count}")
  if num_workers:
    _default_grain_profiling_flag()
  return grain.DataLoader(
      data_source=_RecordIndices(source.records),
      sampler=_EpochSeededSampler(num_records, int(seed)),
      operations=[TrainTransform(source, input_cfg),
                  grain.Batch(global_batch_size // shard_count, drop_remainder=True)],
      worker_count=num_workers,
      worker_buffer_size=worker_buffer_size,
      shard_options=shard_options,
      # The data source holds integers: reader threads would only contend for the GIL (grain's advice for
      # in-memory sources). Decoding happens in the transform, in parallel across worker processes.
      read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
  )


# --------------------------------------------------------------------------------------------------------------------
# Evaluation batches.
# --------------------------------------------------------------------------------------------------------------------


def make_eval_batches(source, input_cfg, batch_size: int, *, shard_index: int = 0,
                      shard_count: int = 1) -> Iterator[dict]:
  """Every record of this shard exactly once, in order, in batches of `batch_size`.

  source: duck-typed (see the module docstring). input_cfg: config.input (see `eval_example`).
  shard_index, shard_count: this process takes records shard_index, shard_index + shard_count, ...; every shard
    yields the same number of batches (ceil(ceil(N / shard_count) / batch_size)), as global arrays need.
  Yields {"image": (B, Hc, Wc, 3) float32, "image_info": (B, 6) float32, "image_id": (B,) int64, "valid": (B,)
  bool}. Slots past the shard's last image repeat its last real example (finite values for the model) with valid
  False; an empty shard pads with zeros.
  Raises RuntimeError naming the file (chained to the source's error) when an image is missing or unreadable: an
  evaluation that silently drops images reports a wrong AP.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
  records = source.records[shard_index::shard_count]
  per_shard = -(-len(source.records) // shard_count)
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
      last = eval_example(record, image, input_cfg)
      examples.append(last)
      valid.append(True)
    if last is None:  # this shard has no records at all
      hc, wc = input_cfg.canvas_hw
      last = {"image": np.zeros((hc, wc, 3), np.float32),
              "image_info": np.zeros((transforms.IMAGE_INFO_SIZE,), np.float32),
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
