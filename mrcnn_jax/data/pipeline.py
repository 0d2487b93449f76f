"""From records to device batches: the grain training loader, evaluation batches, global arrays on the mesh.

  record + image --examples.train_example--> one example: fixed-shape numpy arrays (canvas image, GT in G slots)
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

Each example is `data.examples`' (`train_example`, `eval_example`, the fields they hold); batches stack them along a
new leading axis B, and the training loader adds num_skipped (B,) int32 (unreadable images replaced to make each
example).

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

from mrcnn_jax.data import transforms
from mrcnn_jax.data.examples import check_train_image, eval_example, train_example
from mrcnn_jax.data.records import ImageRecord

# A training example gives up after this many unreadable images in a row: past a few, the image directory is wrong
# rather than a file bad, and looping over the whole dataset would only hide that.
MAX_CONSECUTIVE_SKIPS = 10

# Errors of `source.load_image` that mean "this image file is unusable" (FileNotFoundError is an OSError, so is
# PIL's UnidentifiedImageError). Anything else is a bug and propagates.
_IMAGE_ERRORS = (OSError, ValueError)


class SkippedImageWarning(UserWarning):
  """A training image could not be read and another one took its place."""


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
               shard_count: int, keypoint_offset: float = 0.0, label_map=None):
    self._source = source
    self._records = source.records
    self._input_cfg = input_cfg
    self._plan = plan
    self._canvases = canvas_list
    self._canvas_index = np.asarray(canvas_index, np.int32)
    self._seed = int(seed)
    self._shard_index, self._shard_count = int(shard_index), int(shard_count)
    self._keypoint_offset = float(keypoint_offset)
    self._label_map = None if label_map is None else np.asarray(label_map, np.int32)

  def _example(self, index: int, epoch: int, canvas: int) -> dict:
    skipped = []
    while True:
      record = self._records[index]
      try:
        image = check_train_image(record, self._source.load_image(record))
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
    example = train_example(record, image, self._input_cfg, rng, self._canvases[canvas],
                            keypoint_offset=self._keypoint_offset)
    if self._label_map is not None:
      example["gt_classes"] = self._label_map[example["gt_classes"]]
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
                      shard_options: grain.ShardOptions | None = None, worker_buffer_size: int = 2,
                      keypoint_offset: float = 0.0, label_map=None) -> grain.DataLoader:
  """The training input: an infinite, shuffled, canvas-grouped, process-sharded grain DataLoader of fixed-shape
  batches.

  source: duck-typed, `.records` and `.load_image(record)` (see the module docstring). With num_workers > 0 it is
    pickled into each worker process (grain spawns them), so it should be cheap to pickle.
  input_cfg: config.input (see `examples.train_example`; `canvases` for the grouping).
  global_batch_size: images per step over all processes; each process gets global_batch_size // shard_count.
  seed: in [0, 2**32): the shuffle (a new permutation each epoch, `BatchPlan`) and, with the record index and the
    epoch, each example's augmentation.
  num_workers: worker processes for decoding and augmentation, each building whole batches; 0 runs everything in
    the calling thread.
  shard_options: grain.ShardOptions(shard_index, shard_count) (tests, custom layouts); default one shard per JAX
    process. Shard s takes slots [s * B_local, (s + 1) * B_local) of every global batch.
  worker_buffer_size: batches each worker prepares ahead.
  keypoint_offset: added to the labeled keypoints' x and y (`examples.keypoint_coordinate_offset` of the config).
  label_map: when given, (num_classes + 1,) ints: the class the model trains on for each contiguous label (index 0,
    the empty slots, maps to 0). A model in COCO's category-id label space (model.label_space "coco_ids",
    torchvision's 91 slots) trains on `category_map.label_to_category_id`.

  Returns the loader. `it = iter(loader)` yields dicts of numpy arrays, each field of `examples.train_example`
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
                                  shard_options.shard_index, shard_count, keypoint_offset, label_map)
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

  source: duck-typed (see the module docstring). input_cfg: config.input (see `examples.eval_example`).
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
