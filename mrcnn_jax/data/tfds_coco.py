"""COCO-format datasets as a tensorflow-datasets dataset with instance masks (`coco_instances`), without TensorFlow.

tfds' own `coco/2017` has no instance masks, so this module defines a builder that prepares any COCO-format set from
local files, and a reader that gives the same interface as `coco.CocoSource` (`records`, `category_map`,
`load_image(record)`), so the rest of the input pipeline takes either source.

Neither preparing nor reading imports TensorFlow: the dataset is written as array_record and read through
`tfds.builder_from_directory(path).as_data_source(split)`, whose numpy code path serializes and parses the examples
without TF (tfds 4.9.10; checked by the tests in a fresh interpreter).

Inputs (no download). Either a `manual_dir` in the COCO layout, whose splits are discovered:

  manual_dir/
    annotations/{prefix}_{split}.json     prefix "instances" (config "instances", the default) or "person_keypoints"
    {split}/                              the split's images; the JSON's file_names are relative to this folder

(COCO 2017 unpacked as is gives splits "train2017" and "val2017"; a shapes set from `shapes.write_dataset` gives
"train" and "val"), or an explicit mapping {split: (annotation_file, image_dir)} (`prepare` / the builder's
`split_files`). Split names must be word characters only (tfds' rule).

What is stored: exactly what `coco.load_coco(annotation_file, image_dir, train=False, min_box_size=...)` gives, so the
two paths cannot disagree. Per image, in the JSON's order (shuffling is disabled, so index i of a split is the JSON's
image i):
  image           the file's bytes as stored on disk (tfds Image feature, never re-encoded)
  image_id        int64
  file_name       the JSON's file_name (relative to the split's image folder)
  height, width   int32, from the JSON
  boxes           (n, 4) float32 XYXY in original pixels, clipped to the image (COCO's XYWH converted by `load_coco`)
  category_ids    (n,) int64 COCO category ids, not labels: the mapping to contiguous labels is done at read time
                  through the split's `CategoryMap`, so that one prepared set serves any mapping policy
  is_crowd        (n,) bool
  annotation_ids  (n,) int64
  masks           (n,) compressed COCO RLE counts (bytes), the size being (height, width); polygons and uncompressed
                  RLE are converted at prepare time. Empty when the annotation file has no segmentations (boxes only).
  keypoints       (n * K, 3) float32 (x, y, visibility), K from the metadata; (0, 3) when the set has no keypoints.
                  Flattened because a tfds Tensor allows one unknown dimension, and K is only known from the files.
Instances `load_coco` drops (boxes under `min_box_size` or of negative size, no valid polygon) are dropped, and boxes
clipped, at prepare time; images are all kept, and `load_tfds_source(..., train=True)` skips those without a usable
instance (and those with too few visible keypoints) at read time, as `load_coco` does. Per split, the dataset's
metadata (metadata.json) holds the JSON's categories, K, whether there are masks, and `load_coco`'s drop counts.

Reading builds the records in one sequential pass over the split (the image bytes are read and skipped, since an
example is parsed whole): about the time to read the split's files once (COCO train2017: ~19 GB).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mrcnn_jax.data import coco
from mrcnn_jax.data.images import read_image
from mrcnn_jax.data.records import CategoryMap, ImageRecord

NAME = "coco_instances"
# Bump on any change of what is stored; datasets of another version are rebuilt, never misread.
VERSION = "1.0.0"
# Per-split keys of the metadata; `load_tfds_source` refuses a dataset without them.
METADATA_KEY = "splits"
_SPLIT_NAME = re.compile(r"^\w+$")
# Records are built from batches of examples: array_record reads a batch in parallel.
_READ_BATCH = 256
# `coco.load_coco`'s counts of what it fixed or dropped in the annotations, kept in the metadata at prepare time.
_PREPARED_STATS = ("dropped_negative_boxes", "dropped_small_boxes", "dropped_invalid_polygons", "removed_polygons",
                   "clipped_boxes")

_MANUAL_INSTRUCTIONS = """\
Put the COCO-format files in manual_dir:
  manual_dir/annotations/instances_{split}.json   (person_keypoints_{split}.json for the person_keypoints config)
  manual_dir/{split}/                             the split's images, as named by the JSON's file_name
For COCO 2017: unzip annotations_trainval2017.zip, train2017.zip and val2017.zip into manual_dir.
"""


# ---------------------------------------------------------------------------------------------------------------------
# The builder.


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
  """annotation_prefix: the annotation files are `annotations/{annotation_prefix}_{split}.json` in manual_dir."""

  annotation_prefix: str = "instances"


class CocoInstances(tfds.core.GeneratorBasedBuilder):
  """COCO-format instance annotations (boxes, masks, keypoints) from local files; see the module docstring.

  Besides the usual builder arguments (data_dir, config, file_format: use "array_record" to read without TF):
    split_files: {split: (annotation_file, image_dir)}; by default the splits are discovered in manual_dir.
    splits: keep only these of the discovered splits.
    min_box_size, num_keypoints: passed to `coco.load_coco`.
  These shape the data but are not part of the dataset's name: prepare into a fresh data_dir (or overwrite) when
  they change.
  """

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {"1.0.0": "Images as stored, XYXY boxes, COCO category ids, crowd flags, RLE masks, keypoints."}
  BUILDER_CONFIGS = [
      CocoInstancesConfig(name="instances", annotation_prefix="instances",
                          description="annotations/instances_{split}.json: boxes and masks of all categories."),
      CocoInstancesConfig(name="person_keypoints", annotation_prefix="person_keypoints",
                          description="annotations/person_keypoints_{split}.json: persons with 17 keypoints."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS

  def __init__(self, *, split_files: Mapping[str, tuple] | None = None, splits: Sequence[str] | None = None,
               min_box_size: float = 1.0, num_keypoints: int | None = None, **kwargs):
    self._split_files = None if split_files is None else _check_split_files(split_files)
    self._splits = None if splits is None else tuple(splits)
    self._min_box_size = float(min_box_size)
    self._num_keypoints = num_keypoints
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10's own code_path tests `isinstance(path, importlib_resources.abc.Traversable)` for builders defined
    # in a package, but importlib_resources is only its dependency on Python < 3.9: preparing fails with
    # ModuleNotFoundError. The path only serves to find checksums.tsv next to the module (there is none here).
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly rather than `dataset_info_from_configs`, which reads README/CITATIONS files from this
    # module's folder.
    return tfds.core.DatasetInfo(
        builder=self,
        description="COCO-format instance annotations with masks and keypoints, prepared from local files.",
        features=_features(),
        homepage="https://cocodataset.org",
        # Index i of a split is image i of the JSON, as in `load_coco`: records come out in the same order.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    if self._split_files is not None:
      split_files = dict(self._split_files)
    else:
      split_files = discover_splits(dl_manager.manual_dir, self.builder_config.annotation_prefix)
    if self._splits is not None:
      missing = sorted(set(self._splits) - set(split_files))
      if missing:
        raise ValueError(f"splits {missing} not found; available: {sorted(split_files)}")
      split_files = {s: split_files[s] for s in self._splits}

    generators, metadata = {}, {}
    for split, (annotation_file, image_dir) in split_files.items():
      # Evaluation mode keeps every image; the training filter (skip_empty) is applied at read time.
      source = coco.load_coco(annotation_file, image_dir, train=False, min_box_size=self._min_box_size,
                              num_keypoints=self._num_keypoints)
      metadata[split] = dict(
          annotation_file=os.path.abspath(os.fspath(annotation_file)),
          image_dir=source.image_dir,
          categories=source.coco.dataset["categories"],
          num_keypoints=source.num_keypoints,
          # `load_coco` gives every record masks (a list, [] without instances) or none (a boxes-only file).
          has_masks=source.records[0].masks is not None,
          min_box_size=self._min_box_size,
          stats=dict(source.stats),
      )
      generators[split] = self._generate_examples(source)
    # Written to metadata.json with the dataset info, after the examples.
    self.info.metadata[METADATA_KEY] = metadata
    return generators

  def _generate_examples(self, source: coco.CocoSource):
    for index, record in enumerate(source.records):
      yield index, _encode_record(record, source)


def _features() -> tfds.features.FeaturesDict:
  # Top-level tensors rather than a Sequence of dicts: the numpy reader returns them as arrays, not lists of scalars.
  return tfds.features.FeaturesDict({
      # Bytes are stored as given: Image only encodes numpy/PIL inputs. (None, None, 3): TF readers decode to RGB.
      "image": tfds.features.Image(shape=(None, None, 3)),
      "image_id": np.int64,
      "file_name": tfds.features.Text(),
      "height": np.int32,
      "width": np.int32,
      "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      "category_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
      "is_crowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      "annotation_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
      "masks": tfds.features.Tensor(shape=(None,), dtype=np.object_),
      "keypoints": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
  })


def _encode_record(record: ImageRecord, source: coco.CocoSource) -> dict:
  try:
    image = pathlib.Path(record.file_name).read_bytes()
  except FileNotFoundError:
    raise FileNotFoundError(f"image file not found: {record.file_name} (image id {record.image_id} of "
                            f"{source.annotation_file})") from None
  n = record.num_instances
  if record.masks is None:
    masks = []
  else:
    for rle in record.masks:
      if [int(s) for s in rle["size"]] != [record.height, record.width]:  # load_coco guarantees it; the reader needs it
        raise ValueError(f"image id {record.image_id}: RLE size {rle['size']} differs from the image size")
    masks = [rle["counts"] if isinstance(rle["counts"], bytes) else rle["counts"].encode("ascii")
             for rle in record.masks]
  keypoints = (np.zeros((0, 3), np.float32) if record.keypoints is None
               else np.asarray(record.keypoints, np.float32).reshape(-1, 3))
  return {
      "image": image,
      "image_id": int(record.image_id),
      "file_name": os.path.relpath(record.file_name, source.image_dir),
      "height": record.height,
      "width": record.width,
      "boxes": np.asarray(record.boxes, np.float32).reshape(n, 4),
      "category_ids": np.array([source.category_map.to_category_id(int(c)) for c in record.classes],
                               np.int64).reshape(n),
      "is_crowd": np.asarray(record.is_crowd, bool).reshape(n),
      "annotation_ids": np.asarray(record.annotation_ids, np.int64).reshape(n),
      "masks": masks,
      "keypoints": keypoints,
  }


# ---------------------------------------------------------------------------------------------------------------------
# Preparing.


def discover_splits(manual_dir, annotation_prefix: str = "instances") -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
  """{split: (annotation_file, image_dir)} for every `annotations/{prefix}_{split}.json` in manual_dir.

  Raises FileNotFoundError when there is none, or when a split's image folder is missing.
  """
  root = pathlib.Path(os.fspath(manual_dir))
  pattern = f"{annotation_prefix}_*.json"
  splits = {}
  for path in sorted((root / "annotations").glob(pattern)):
    split = path.name[len(annotation_prefix) + 1:-len(".json")]
    image_dir = root / split
    if not image_dir.is_dir():
      raise FileNotFoundError(f"{path} has no image folder {image_dir}")
    splits[split] = (path, image_dir)
  if not splits:
    raise FileNotFoundError(f"no annotation files {root / 'annotations' / pattern}\n{_MANUAL_INSTRUCTIONS}")
  return _check_split_files(splits)


def _check_split_files(split_files: Mapping[str, tuple]) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
  checked = {}
  for split, files in split_files.items():
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
      raise ValueError(f"split name {split!r} must consist of letters, digits and underscores (a tfds split name)")
    annotation_file, image_dir = files
    checked[split] = (pathlib.Path(os.fspath(annotation_file)), pathlib.Path(os.fspath(image_dir)))
  return checked


def prepare(source, data_dir, *, config: str = "instances", splits: Sequence[str] | None = None,
            min_box_size: float = 1.0, num_keypoints: int | None = None, overwrite: bool = False) -> pathlib.Path:
  """Prepare the `coco_instances` dataset from local files as array_record; no TensorFlow needed.

  source: a manual_dir in the COCO layout (module docstring), or a mapping {split: (annotation_file, image_dir)}.
  data_dir: the tfds data directory; the dataset goes to data_dir/coco_instances/{config}/{VERSION}.
  config: "instances" or "person_keypoints" (which annotation files a manual_dir is searched for).
  splits: with a manual_dir, prepare only these splits.
  min_box_size, num_keypoints: as in `coco.load_coco`.
  overwrite: replace an existing dataset at that place; otherwise an existing one is reused as is (tfds' rule), even
    if it was prepared from other files.
  Returns the dataset's directory, the path for `load_tfds_source` or `tfds.builder_from_directory`.
  Raises what `coco.load_coco` raises for bad annotation files, and FileNotFoundError naming a missing image (a
  corrupt image is stored as is and fails when loaded, as with the JSON path).
  """
  if isinstance(source, Mapping):
    if splits is not None:
      raise ValueError("splits selects among a manual_dir's splits; with explicit split_files, pass only those")
    kwargs = dict(split_files=source)
    manual_dir = None
  else:
    kwargs = dict(splits=splits)
    manual_dir = os.fspath(source)
  builder = CocoInstances(data_dir=os.fspath(data_dir), config=config, file_format="array_record",
                          min_box_size=min_box_size, num_keypoints=num_keypoints, **kwargs)
  modes = tfds.download.GenerateMode
  mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS
  # try_download_gcs=False: nothing is hosted for this dataset, and probing GCS needs network (and TF's error types).
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=mode, try_download_gcs=False))
  return pathlib.Path(os.fspath(builder.data_dir))


# ---------------------------------------------------------------------------------------------------------------------
# Reading.


def dataset_dir(data_dir, config: str = "instances") -> pathlib.Path:
  """The prepared dataset's directory: data_dir itself when it holds dataset_info.json, else the newest version in
  data_dir/coco_instances/{config}/. Raises FileNotFoundError when there is none."""
  root = pathlib.Path(os.fspath(data_dir))
  if (root / "dataset_info.json").is_file():
    return root
  parent = root / NAME / config
  versions = []
  if parent.is_dir():
    for child in parent.iterdir():
      try:
        version = tfds.core.Version(child.name)
      except ValueError:  # incomplete.* folders of an interrupted preparation, stray files
        continue
      if (child / "dataset_info.json").is_file():
        versions.append((version, child))
  if not versions:
    raise FileNotFoundError(f"no prepared {NAME} dataset (config {config!r}) in {root}; run tfds_coco.prepare")
  return max(versions, key=lambda v: v[0])[1]


@dataclasses.dataclass
class TfdsSource:
  """A `coco_instances` split, with the interface of `coco.CocoSource`.

  records: one `ImageRecord` per kept image, in the annotation file's order; `file_name` is the JSON's file_name
    (relative to the original image folder; the image itself comes from the dataset, through `load_image`).
  category_map: the split's category ids <-> contiguous labels 1..K (from the annotation file's categories).
  stats: the same counts as `CocoSource.stats` for the same `train` / `skip_empty`.
  num_keypoints: K of the records' (n, K, 3) keypoints, or None.
  Picklable (for loader worker processes): the tfds data source is reopened on first use after unpickling.
  """

  records: list[ImageRecord]
  category_map: CategoryMap
  stats: dict[str, int]
  dataset_dir: pathlib.Path
  split: str
  num_keypoints: int | None = None
  categories: list[dict] = dataclasses.field(default_factory=list)  # the JSON's categories, as stored
  _index: dict[int, int] = dataclasses.field(default_factory=dict, repr=False)  # image id -> example index
  _data_source: object = dataclasses.field(default=None, repr=False, compare=False)

  def load_image(self, record: ImageRecord) -> np.ndarray:
    """The record's image as (H, W, 3) uint8 RGB, decoded as `images.read_image` decodes the file.

    Raises ValueError naming the image for undecodable bytes or a size other than the record's (the training loader
    skips such images, evaluation lets the error stop the run), KeyError for a record not from this split.
    """
    try:
      index = self._index[record.image_id]
    except KeyError:
      raise KeyError(f"image id {record.image_id} is not in split {self.split!r} of {self.dataset_dir}") from None
    data = self._source()[index]["image"]
    where = f"{record.file_name} (image id {record.image_id}, split {self.split!r} of {self.dataset_dir})"
    return decode_image(data, where, (record.height, record.width))

  def _source(self):
    if self._data_source is None:
      self._data_source = _open(self.dataset_dir, self.split)
    return self._data_source

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_data_source"] = None  # file handles do not pickle; reopened lazily
    return state


def _open(path: pathlib.Path, split: str, builder=None):
  """The split's tfds data source (numpy, no TF); `builder` from `builder_from_directory(path)` if already made."""
  builder = builder or tfds.builder_from_directory(os.fspath(path))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} is not in {path}; it has {sorted(builder.info.splits)}")
  # SkipDecoding: the image stays the stored bytes, decoded by `decode_image` exactly like the JSON path's files.
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def load_tfds_source(data_dir, split: str, *, train: bool, skip_empty: bool = True,
                     config: str = "instances", min_keypoints_per_image: int = 0) -> TfdsSource:
  """Read a prepared `coco_instances` split (no TensorFlow) as the same records `coco.load_coco` gives.

  data_dir: the dataset's directory (what `prepare` returns) or the tfds data_dir it was prepared into.
  split: e.g. "train2017", or "train" / "val" for a shapes set.
  train, skip_empty, min_keypoints_per_image: as in `load_coco` (the same rules, `coco.keep_for_training`):
    training skips images without a usable (non-crowd) instance and, with min_keypoints_per_image > 0, images with
    fewer visible keypoints than that.
  Raises FileNotFoundError when no dataset is found, ValueError for an unknown split or a dataset without this
  module's metadata.
  """
  path = dataset_dir(data_dir, config)
  builder = tfds.builder_from_directory(os.fspath(path))
  source = _open(path, split, builder)
  try:
    meta = builder.info.metadata[METADATA_KEY][split]
  except (KeyError, TypeError):
    raise ValueError(f"{path} has no {NAME} metadata for split {split!r}: not prepared by tfds_coco.prepare") from None
  category_map = CategoryMap.from_coco_categories(meta["categories"])
  num_keypoints = meta["num_keypoints"]
  has_masks = bool(meta["has_masks"])

  records, index = [], {}
  # The annotation fixes happened at prepare time (a set prepared before a count existed has none of it).
  stats = coco.new_stats(len(source))
  stats.update({key: int(meta["stats"].get(key, 0)) for key in _PREPARED_STATS})
  for start in range(0, len(source), _READ_BATCH):
    positions = list(range(start, min(start + _READ_BATCH, len(source))))
    for position, example in zip(positions, source.__getitems__(positions)):
      record = _decode_record(example, category_map, num_keypoints, has_masks, path, split)
      if train and not coco.keep_for_training(record, stats, skip_empty=skip_empty,
                                              min_keypoints_per_image=min_keypoints_per_image):
        continue
      coco.count_instances(record, stats)
      records.append(record)
      index[record.image_id] = position
  stats["kept"] = len(records)
  return TfdsSource(records, category_map, stats, path, split, num_keypoints, list(meta["categories"]), index, source)


def _decode_record(example: dict, category_map: CategoryMap, num_keypoints, has_masks, path, split) -> ImageRecord:
  image_id = int(example["image_id"])
  height, width = int(example["height"]), int(example["width"])
  boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
  n = boxes.shape[0]
  try:
    classes = np.array([category_map.to_label(c) for c in example["category_ids"]], np.int32).reshape(n)
  except KeyError as e:  # only a dataset edited after preparing: the categories come from the same file
    raise ValueError(f"{path} split {split!r}, image id {image_id}: {e.args[0]}") from None
  masks = None
  if has_masks:
    masks = [{"size": [height, width], "counts": bytes(c)} for c in example["masks"]]
  keypoints = None
  if num_keypoints is not None:
    keypoints = np.asarray(example["keypoints"], np.float32).reshape(n, num_keypoints, 3)
  file_name = example["file_name"]
  return ImageRecord(
      image_id=image_id,
      file_name=file_name.decode("utf-8") if isinstance(file_name, bytes) else str(file_name),
      height=height,
      width=width,
      boxes=boxes,
      classes=classes,
      is_crowd=np.asarray(example["is_crowd"], bool).reshape(n),
      masks=masks,
      keypoints=keypoints,
      annotation_ids=np.asarray(example["annotation_ids"], np.int64).reshape(n),
  )


def decode_image(data: bytes, where: str, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Encoded image bytes -> (H, W, 3) uint8 RGB: `images.read_image` on the bytes, so both sources decode alike.
  `where` names the image in error messages."""
  return read_image(where, expected_hw, data=data)

