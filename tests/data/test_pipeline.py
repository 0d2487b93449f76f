"""The training and evaluation input: hand-computed boxes, keypoints and mask crops after resize and flip, the G-slot
selection, and the grain loader's determinism, sharding, bad-image handling and checkpoint restore; device batches
on 8 CPU devices."""

import warnings

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from pycocotools import mask as mask_utils

from conftest import load_config  # tests/conftest.py, on sys.path through pytest's rootdir conftest
from mrcnn_jax.data import examples, pipeline, transforms
from mrcnn_jax.data.records import ImageRecord

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless, and not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

MASK_SIZE = 16


def _input_cfg(**overrides) -> ml_collections.ConfigDict:
  """The R50-FPN config's input fields, shrunk to 128 x 128 canvases, with `overrides`."""
  fields = load_config("mask_rcnn_R50_FPN_1x").input.to_dict()
  fields.update(min_size_train=(64, 96), max_size_train=128, min_size_test=64, max_size_test=128,
                canvases=((128, 128),), max_instances=4, gt_mask_size=MASK_SIZE)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _rle(mask: np.ndarray) -> dict:
  return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _rect_mask(hw, box) -> np.ndarray:
  """Full-image bitmap of the pixels inside an integer XYXY box."""
  mask = np.zeros(hw, np.uint8)
  x1, y1, x2, y2 = (int(v) for v in box)
  mask[y1:y2, x1:x2] = 1
  return mask


def _record(image_id, hw, boxes, classes=None, is_crowd=None, masks=None, keypoints=None, file_name=None):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  return ImageRecord(
      image_id=image_id,
      file_name=file_name or f"/data/img_{image_id}.png",
      height=hw[0],
      width=hw[1],
      boxes=boxes,
      classes=np.asarray(classes if classes is not None else np.arange(1, n + 1), np.int32),
      is_crowd=np.asarray(is_crowd if is_crowd is not None else np.zeros(n), bool),
      masks=masks,
      keypoints=None if keypoints is None else np.asarray(keypoints, np.float32),
      annotation_ids=np.arange(1000 * image_id, 1000 * image_id + n, dtype=np.int64),
  )


class FakeSource:
  """In-memory source with the CocoSource interface; `bad` maps file names to "missing" or "corrupt"."""

  def __init__(self, records, images, bad=None):
    self.records = records
    self._images = images
    self._bad = dict(bad or {})

  def load_image(self, record):
    kind = self._bad.get(record.file_name)
    if kind == "missing":
      raise FileNotFoundError(f"image file not found: {record.file_name}")
    if kind == "corrupt":
      raise ValueError(f"cannot decode image file {record.file_name}: truncated")
    return self._images[record.file_name]


def _make_source(num_images=8, seed=0, bad=None) -> FakeSource:
  """Images of 64..128 px sides with 1..3 rectangle instances (RLE masks), ids 100, 101, ..."""
  rng = np.random.default_rng(seed)
  records, images = [], {}
  for i in range(num_images):
    h, w = (int(s) for s in rng.integers(64, 129, size=2))
    boxes, masks = [], []
    for _ in range(int(rng.integers(1, 4))):
      x1, y1 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
      box = [x1, y1, int(rng.integers(x1 + 8, w + 1)), int(rng.integers(y1 + 8, h + 1))]
      boxes.append(box)
      masks.append(_rle(_rect_mask((h, w), box)))
    record = _record(100 + i, (h, w), boxes, masks=masks)
    records.append(record)
    images[record.file_name] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  return FakeSource(records, images, bad)


# --------------------------------------------------------------------------------------------------------------------
# One training example.
# --------------------------------------------------------------------------------------------------------------------

# A 100 x 50 (H x W) image resized to short side 64 is 128 x 64: scale 1.28 on both axes.
TALL_HW = (100, 50)
TALL_BOX = [10, 20, 42, 68]  # 32 x 48 px: whole multiples of the 16-cell crop, so RoIAlign samples pixel centres


def _tall_example(flip, **cfg_overrides):
  mask = _rect_mask(TALL_HW, TALL_BOX)
  mask[:, 26:] = 0  # the left half of the box only: columns 10..25 of 10..41
  record = _record(7, TALL_HW, [TALL_BOX], classes=[5], masks=[_rle(mask)])
  image = np.random.default_rng(1).integers(0, 256, size=TALL_HW + (3,), dtype=np.uint8)
  cfg = _input_cfg(**cfg_overrides)
  return record, image, cfg, examples.transform_train_example(record, image, cfg, short_side=64, flip=flip)


@pytest.mark.parametrize("mode", ["detectron2", "torchvision"])
def test_resize_and_flip_hand_computed(mode):
  _, image, cfg, plain = _tall_example(False, resize_mode=mode)
  _, _, _, flipped = _tall_example(True, resize_mode=mode)
  # Resized: x * 1.28, y * 1.28. Flipped in the 64 px wide resized image: x -> 64 - x.
  np.testing.assert_allclose(plain["gt_boxes"][0], [12.8, 25.6, 53.76, 87.04], rtol=0, atol=1e-4)
  np.testing.assert_allclose(flipped["gt_boxes"][0], [64 - 53.76, 25.6, 64 - 12.8, 87.04], rtol=0, atol=1e-4)
  np.testing.assert_array_equal(plain["gt_boxes"][1:], 0)
  np.testing.assert_allclose(plain["image_info"], [128, 64, 1.28, 1.28, 100, 50], rtol=1e-6)
  np.testing.assert_array_equal(flipped["image_info"], plain["image_info"])

  # Without the flip the image is the test-time input at short side 64; with it, the valid region mirrored.
  canvas, info = transforms.preprocess(image, cfg)
  np.testing.assert_array_equal(plain["image"], canvas)
  np.testing.assert_array_equal(plain["image_info"], info)
  np.testing.assert_array_equal(flipped["image"][:128, :64], canvas[:128, 63::-1])
  np.testing.assert_array_equal(flipped["image"][:, 64:], 0)


def test_mask_crops_inside_own_box_follow_the_flip():
  _, _, _, plain = _tall_example(False)
  _, _, _, flipped = _tall_example(True)
  # The mask fills the left 16 of the box's 32 columns: crop columns 0..7 full, 8..15 empty; mirrored by the flip.
  expected = np.zeros((MASK_SIZE, MASK_SIZE), np.uint8)
  expected[:, :8] = 255
  np.testing.assert_array_equal(plain["gt_masks"][0], expected)
  np.testing.assert_array_equal(flipped["gt_masks"][0], expected[:, ::-1])
  np.testing.assert_array_equal(plain["gt_masks"][1:], 0)

  # A rectangle mask cropped to its own box is all 255, flipped or not.
  record = _record(1, TALL_HW, [TALL_BOX], masks=[_rle(_rect_mask(TALL_HW, TALL_BOX))])
  image = np.zeros(TALL_HW + (3,), np.uint8)
  for flip in (False, True):
    ex = examples.transform_train_example(record, image, _input_cfg(), short_side=64, flip=flip)
    np.testing.assert_array_equal(ex["gt_masks"][0], 255)


def test_keypoints_scaled_flipped_and_swapped_by_the_flip_map():
  # 3 keypoints: 0 (nose), 1 (left eye), 2 (right eye); the flip swaps 1 and 2.
  kps = [[[20, 30, 2], [10, 40, 2], [40, 44, 1]],
         [[15, 25, 0], [30, 50, 2], [200, 50, 2]]]  # an unlabeled one, and one outside the image
  record = _record(3, TALL_HW, [TALL_BOX, [5, 5, 45, 95]], keypoints=kps)
  image = np.zeros(TALL_HW + (3,), np.uint8)
  cfg = _input_cfg(num_keypoints=3, keypoint_flip_map=((1, 2),))
  plain = examples.transform_train_example(record, image, cfg, short_side=64, flip=False)
  flipped = examples.transform_train_example(record, image, cfg, short_side=64, flip=True)
  s = 1.28
  expected_plain = [[[20 * s, 30 * s, 2], [10 * s, 40 * s, 2], [40 * s, 44 * s, 1]],
                    [[0, 0, 0], [30 * s, 50 * s, 2], [0, 0, 0]]]
  expected_flipped = [[[64 - 20 * s, 30 * s, 2], [64 - 40 * s, 44 * s, 1], [64 - 10 * s, 40 * s, 2]],
                      [[0, 0, 0], [0, 0, 0], [64 - 30 * s, 50 * s, 2]]]
  assert plain["gt_keypoints"].shape == (4, 3, 3)
  np.testing.assert_allclose(plain["gt_keypoints"][:2], expected_plain, rtol=0, atol=1e-4)
  np.testing.assert_allclose(flipped["gt_keypoints"][:2], expected_flipped, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(flipped["gt_keypoints"][2:], 0)



@pytest.mark.parametrize("config_name, offset", [("keypoint_rcnn_R50_FPN_1x", 0.5),
                                                 ("keypoint_rcnn_R50_FPN_torchvision", 0.0)])
def test_training_keypoints_carry_the_configs_coordinate_offset(config_name, offset):
  """The trainer's input (`train._training_input`, the loader it builds from the config) adds
  model.keypoint_head.coordinate_offset to the annotated x and y before resizing: Detectron2's load_coco_json
  adds 0.5 to COCO's pixel indices, torchvision keeps them. Nose (20, 30) and left eye (49, 99), the image's last
  pixel, in a 100 x 50 image resized by 1.28; a flip mirrors x in the 64 px wide image and swaps the eyes."""
  from mrcnn_jax import train  # pylint: disable=import-outside-toplevel

  config = load_config(config_name)
  config.input.update(dict(min_size_train=(64,), max_size_train=128, canvases=((128, 128),), max_instances=4))
  config.train.update(dict(batch_size=1, num_workers=0))
  keypoints = np.zeros((1, 17, 3), np.float32)
  keypoints[0, 0] = (20, 30, 2)
  keypoints[0, 1] = (49, 99, 1)
  record = _record(3, TALL_HW, [TALL_BOX], keypoints=keypoints)
  source = FakeSource([record], {record.file_name: np.zeros(TALL_HW + (3,), np.uint8)})
  batches = train._training_input(config, source)
  seen = set()
  for _ in range(6):  # the loader's own draws decide each flip: see both
    batch = next(batches)
    kp, box = batch["gt_keypoints"][0, 0], batch["gt_boxes"][0, 0]
    flipped = not np.allclose(box, [12.8, 25.6, 53.76, 87.04], atol=1e-4)
    seen.add(flipped)
    nose = ((20 + offset) * 1.28, (30 + offset) * 1.28)
    eye = ((49 + offset) * 1.28, (99 + offset) * 1.28)  # 63.36, 127.36 with 0.5: inside the 64 x 128 image
    if flipped:
      expected = {0: (64 - nose[0], nose[1], 2), 2: (64 - eye[0], eye[1], 1)}  # the left eye is now the right one
    else:
      expected = {0: (nose[0], nose[1], 2), 1: (eye[0], eye[1], 1)}
    for j in range(17):
      np.testing.assert_allclose(kp[j], expected.get(j, (0, 0, 0)), rtol=0, atol=1e-4, err_msg=f"{flipped} {j}")
  assert seen == {False, True}

def test_keeps_the_largest_instances_crowd_last_and_counts_the_dropped():
  hw = (100, 100)
  # Areas: 100, 400 (crowd), 900, 49, 196.
  boxes = [[0, 0, 10, 10], [0, 0, 20, 20], [0, 0, 30, 30], [0, 0, 7, 7], [0, 0, 14, 14]]
  record = _record(5, hw, boxes, classes=[1, 2, 3, 4, 5], is_crowd=[0, 1, 0, 0, 0])
  image = np.zeros(hw + (3,), np.uint8)
  ex = examples.transform_train_example(record, image, _input_cfg(max_instances=3), short_side=64, flip=False)
  # The 3 largest non-crowd (900, 196, 100), in annotation order; the larger crowd box had no room left.
  np.testing.assert_array_equal(ex["gt_classes"], [1, 3, 5])
  np.testing.assert_array_equal(ex["gt_valid"], [True, True, True])
  np.testing.assert_array_equal(ex["gt_is_crowd"], [False, False, False])
  np.testing.assert_allclose(ex["gt_boxes"][:, 2], [6.4, 19.2, 8.96], rtol=1e-6)
  assert ex["num_dropped"] == 2

  # With room to spare the crowd box stays, flagged.
  ex = examples.transform_train_example(record, image, _input_cfg(max_instances=8), short_side=64, flip=False)
  np.testing.assert_array_equal(ex["gt_classes"], [1, 2, 3, 4, 5, 0, 0, 0])
  np.testing.assert_array_equal(ex["gt_is_crowd"][:5], [False, True, False, False, False])
  np.testing.assert_array_equal(ex["gt_valid"], [True] * 5 + [False] * 3)
  assert ex["num_dropped"] == 0


def test_fixed_shapes_and_dtypes_with_and_without_instances():
  cfg = _input_cfg()
  expected = {
      "image": ((128, 128, 3), np.float32), "image_info": ((6,), np.float32), "gt_boxes": ((4, 4), np.float32),
      "gt_classes": ((4,), np.int32), "gt_valid": ((4,), np.bool_), "gt_is_crowd": ((4,), np.bool_),
      "gt_masks": ((4, MASK_SIZE, MASK_SIZE), np.uint8), "gt_keypoints": ((4, 17, 3), np.float32),
      "image_id": ((), np.int64), "num_dropped": ((), np.int32),
  }
  empty = _record(9, (70, 90), np.zeros((0, 4)), masks=[])
  source = _make_source(2)
  cases = [(empty, np.zeros((70, 90, 3), np.uint8)), (source.records[0], source.load_image(source.records[0]))]
  for record, image in cases:
    ex = examples.train_example(record, image, cfg, np.random.default_rng(0))
    assert {k: (v.shape, v.dtype) for k, v in ex.items()} == expected
    assert ex["image_id"] == record.image_id
  assert not ex["gt_valid"][3:].any() and ex["gt_valid"][: source.records[0].num_instances].all()


def test_random_choices_are_reproducible_and_cover_sizes_and_flips():
  source = _make_source(1)
  record, image = source.records[0], source.load_image(source.records[0])
  cfg = _input_cfg()
  seen = set()
  for seed in range(16):
    a = examples.train_example(record, image, cfg, np.random.default_rng(seed))
    b = examples.train_example(record, image, cfg, np.random.default_rng(seed))
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    short = int(min(a["image_info"][:2]))
    box = record.boxes[0] * np.array([a["image_info"][3], a["image_info"][2]] * 2)
    flipped = not np.allclose(a["gt_boxes"][0], box, atol=1e-3)
    seen.add((short, flipped))
  assert {s for s, _ in seen} <= {64, 96} and len(seen) == 4


def test_size_mismatch_names_the_file():
  record = _record(1, (50, 60), [[1, 1, 9, 9]])
  with pytest.raises(ValueError, match="img_1.png"):
    examples.train_example(record, np.zeros((60, 50, 3), np.uint8), _input_cfg(), np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------------------------
# The training loader.
# --------------------------------------------------------------------------------------------------------------------


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
      np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def _loader(source, seed=0, batch=4, workers=0, shard=(0, 1), **cfg):
  return pipeline.make_train_loader(source, _input_cfg(**cfg), global_batch_size=batch, seed=seed,
                                    num_workers=workers, shard_options=pipeline.grain.ShardOptions(*shard))


def test_loader_batches_have_fixed_shapes_and_epochs_cover_the_dataset():
  source = _make_source(8)
  batches = _take(iter(_loader(source, batch=4)), 4)
  for b in batches:
    assert b["image"].shape == (4, 128, 128, 3) and b["image"].dtype == np.float32
    assert b["gt_masks"].shape == (4, 4, MASK_SIZE, MASK_SIZE) and b["gt_masks"].dtype == np.uint8
    assert b["image_id"].shape == (4,) and b["image_id"].dtype == np.int64
    assert b["num_skipped"].dtype == np.int32 and not b["num_skipped"].any()
  ids = [np.concatenate([b["image_id"] for b in batches[i : i + 2]]) for i in (0, 2)]
  # Each epoch is a permutation of the dataset, and the next epoch is shuffled anew.
  assert sorted(ids[0]) == sorted(ids[1]) == list(range(100, 108))
  assert list(ids[0]) != list(ids[1])


def test_a_label_map_gives_the_model_category_ids():
  """model.label_space "coco_ids" (the torchvision configs): the loader hands the model each instance's category id,
  through the source's CategoryMap, where a contiguous-label model gets the labels 1..K."""
  from mrcnn_jax import train
  from mrcnn_jax.data.records import CategoryMap

  source = _make_source(8)  # instances labelled 1, 2, 3 in each image
  source.category_map = CategoryMap.from_coco_categories([{"id": i, "name": n} for i, n in ((1, "a"), (3, "b"),
                                                                                                 (7, "c"))])
  config = ml_collections.ConfigDict({"model": {"label_space": "coco_ids"}})
  label_map = train._training_label_map(config, source)  # pylint: disable=protected-access
  assert label_map == (0, 1, 3, 7)
  config.model.label_space = "contiguous"
  assert train._training_label_map(config, source) is None  # pylint: disable=protected-access

  plain = _take(iter(_loader(source)), 2)
  mapped = _take(iter(pipeline.make_train_loader(source, _input_cfg(), global_batch_size=4, seed=0, num_workers=0,
                                                 shard_options=pipeline.grain.ShardOptions(0, 1),
                                                 label_map=label_map)), 2)
  for a, b in zip(plain, mapped):
    assert set(np.unique(a["gt_classes"][a["gt_valid"]])) <= {1, 2, 3}
    np.testing.assert_array_equal(b["gt_classes"], np.asarray(label_map)[a["gt_classes"]])
    assert (b["gt_classes"][~b["gt_valid"]] == 0).all() and {3, 7} & set(b["gt_classes"].ravel())
    np.testing.assert_array_equal(a["gt_boxes"], b["gt_boxes"])


def test_loader_is_deterministic_for_a_seed():
  source = _make_source(8)
  first = _take(iter(_loader(source, seed=3)), 3)
  _assert_batches_equal(first, _take(iter(_loader(source, seed=3)), 3))
  other = _take(iter(_loader(source, seed=4)), 2)
  order = lambda bs: [int(i) for b in bs for i in b["image_id"]]  # noqa: E731
  assert order(first[:2]) != order(other)


def test_augmentation_depends_on_record_and_epoch_not_on_sharding():
  source = _make_source(8)
  single = _take(iter(_loader(source, batch=4)), 2)
  sharded = [_take(iter(_loader(source, batch=4, shard=(s, 2))), 2) for s in range(2)]
  by_id = lambda bs: {int(i): b["image"][j] for b in bs for j, i in enumerate(b["image_id"])}  # noqa: E731
  got = {**by_id(sharded[0]), **by_id(sharded[1])}  # together, the first epoch
  for image_id, image in by_id(single).items():
    np.testing.assert_array_equal(got[image_id], image)
  # The oracle: each example's rng is default_rng([seed, record index, epoch]) (epoch 0 here, seed 0).
  for index, record in enumerate(source.records):
    expected = examples.train_example(record, source.load_image(record), _input_cfg(),
                                      np.random.default_rng([0, index, 0]))
    np.testing.assert_array_equal(got[record.image_id], expected["image"])


def test_two_shards_partition_an_epoch():
  source = _make_source(8)
  shards = [_take(iter(_loader(source, batch=4, shard=(s, 2))), 2) for s in range(2)]
  ids = [[int(i) for b in batches for i in b["image_id"]] for batches in shards]
  assert all(b["image_id"].shape == (2,) for batches in shards for b in batches)  # per-process batch 4 // 2
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == list(range(100, 108))


def test_bad_images_are_skipped_with_a_warning_and_counted():
  good = _make_source(8)
  bad_files = {good.records[2].file_name: "missing", good.records[5].file_name: "corrupt"}
  source = FakeSource(good.records, good._images, bad_files)
  with pytest.warns(pipeline.SkippedImageWarning) as caught:
    batches = _take(iter(_loader(source, batch=4)), 2)  # one epoch
  messages = " ".join(str(w.message) for w in caught)
  assert "img_102.png" in messages and "img_105.png" in messages
  assert sum(int(b["num_skipped"].sum()) for b in batches) == 2
  ids = [int(i) for b in batches for i in b["image_id"]]
  assert 102 not in ids and 105 not in ids and len(ids) == 8
  # The replacement is the next record, so 103 and 106 appear twice.
  assert ids.count(103) == 2 and ids.count(106) == 2


def test_an_unreadable_image_directory_fails_instead_of_looping():
  good = _make_source(12)
  source = FakeSource(good.records, good._images, {r.file_name: "missing" for r in good.records})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", pipeline.SkippedImageWarning)
    with pytest.raises(RuntimeError, match="consecutive training images"):
      next(iter(_loader(source)))


@pytest.mark.parametrize("workers", [0, 2])
def test_checkpoint_restore_continues_with_the_same_batches(workers):
  source = _make_source(8)
  it = iter(_loader(source, seed=5, batch=2, workers=workers))
  straight = _take(it, 3)
  state = it.get_state()
  straight += _take(it, 3)
  # A new loader over the same dataset, as after a restart.
  it2 = iter(_loader(source, seed=5, batch=2, workers=workers))
  it2.set_state(state)
  _assert_batches_equal(straight[3:], _take(it2, 3))


# Landscape and portrait canvases, for the grouping tests: a 64 x 112 image resized to short side 64 or 96 (max 128)
# is at most 73 x 128, so it goes to the landscape canvas at every scale; its transpose to the portrait one.
ORIENTED = dict(canvases=((96, 128), (128, 96)))


def _oriented_source(num_images=12, seed=0) -> FakeSource:
  """Images alternately landscape (64 x 112) and portrait (112 x 64), each with one box, ids 100, 101, ..."""
  rng = np.random.default_rng(seed)
  records, images = [], {}
  for i in range(num_images):
    hw = (64, 112) if i % 3 else (112, 64)
    record = _record(100 + i, hw, [[4, 4, 40, 40]], masks=[_rle(_rect_mask(hw, [4, 4, 40, 40]))])
    records.append(record)
    images[record.file_name] = rng.integers(0, 256, size=hw + (3,), dtype=np.uint8)
  return FakeSource(records, images)


def test_batches_are_grouped_by_canvas():
  """Each batch holds images of one canvas only (its images' shape), the canvas that holds each image; every
  image comes once per epoch apart from what a group carries over to the next."""
  source = _oriented_source(12)
  portrait = {r.image_id for r in source.records if r.height > r.width}
  batches = _take(iter(_loader(source, batch=2, **ORIENTED)), 12)
  shapes = set()
  for b in batches:
    shapes.add(b["image"].shape[1:3])
    tall = {int(i) in portrait for i in b["image_id"]}
    assert len(tall) == 1 and b["image"].shape[1:3] == ((128, 96) if tall.pop() else (96, 128))
  assert shapes == {(96, 128), (128, 96)}
  # The plan, the oracle: epoch e's permutation of default_rng([seed, e]) queued by canvas, batches in fill order.
  order = np.random.default_rng([0, 0]).permutation(12)
  queues, expected = {True: [], False: []}, []
  for index in order:
    tall = source.records[index].height > source.records[index].width
    queues[tall].append(100 + int(index))
    if len(queues[tall]) == 2:
      expected.append(queues[tall])
      queues[tall] = []
  got = [[int(i) for i in b["image_id"]] for b in batches[:len(expected)]]
  assert got == expected


def test_all_shards_agree_on_every_steps_canvas_and_the_worker_count_does_not_matter():
  source = _oriented_source(12)
  shards = [_take(iter(_loader(source, batch=4, shard=(s, 2), **ORIENTED)), 8) for s in range(2)]
  assert [b["image"].shape for b in shards[0]] == [b["image"].shape for b in shards[1]]
  with_workers = _take(iter(_loader(source, batch=4, shard=(1, 2), workers=2, **ORIENTED)), 8)
  _assert_batches_equal(shards[1], with_workers)


def test_an_image_that_fits_no_canvas_fails_before_training_naming_it():
  source = _oriented_source(3)
  with pytest.raises(ValueError, match=r"1 images fit none of the canvases.*img_100.png \(112x64\)"):
    _loader(source, batch=2, canvases=((96, 128),))


def test_loader_rejects_a_batch_that_does_not_split_over_processes():
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    _loader(_make_source(2), batch=3, shard=(0, 2))


# --------------------------------------------------------------------------------------------------------------------
# Evaluation batches.
# --------------------------------------------------------------------------------------------------------------------


def test_eval_batches_cover_every_image_once_with_padding():
  source = _make_source(5)
  cfg = _input_cfg()
  batches = list(pipeline.make_eval_batches(source, cfg, 2))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([b["valid"] for b in batches]), [True] * 5 + [False])
  ids = np.concatenate([b["image_id"] for b in batches])
  assert list(ids[:5]) == list(range(100, 105))
  for b in batches:
    assert b["image"].shape == (2, 128, 128, 3) and b["image_info"].shape == (2, 6)
  canvas, info = transforms.preprocess(source.load_image(source.records[4]), cfg)
  np.testing.assert_array_equal(batches[2]["image"][0], canvas)
  np.testing.assert_array_equal(batches[2]["image_info"][0], info)

  # Two shards: same number of batches each, together every image once.
  shards = [list(pipeline.make_eval_batches(source, cfg, 2, shard_index=s, shard_count=2)) for s in range(2)]
  assert len(shards[0]) == len(shards[1]) == 2
  valid_ids = [int(i) for batches in shards for b in batches for i in b["image_id"][b["valid"]]]
  assert sorted(valid_ids) == list(range(100, 105))


def test_eval_batches_are_grouped_by_canvas_in_the_same_order_on_every_shard():
  source = _oriented_source(7)
  cfg = _input_cfg(**ORIENTED)
  batches = list(pipeline.make_eval_batches(source, cfg, 2))
  # Landscape group first (the canvases' order): ids 101, 102, 104, 105; then the portrait ones: 100, 103, 106.
  assert [b["image"].shape[1:3] for b in batches] == [(96, 128)] * 2 + [(128, 96)] * 2
  ids = [int(i) for b in batches for i, v in zip(b["image_id"], b["valid"]) if v]
  assert ids == [101, 102, 104, 105, 100, 103, 106]
  shards = [list(pipeline.make_eval_batches(source, cfg, 2, shard_index=s, shard_count=2)) for s in range(2)]
  assert [b["image"].shape for b in shards[0]] == [b["image"].shape for b in shards[1]]
  valid = sorted(int(i) for bs in shards for b in bs for i, v in zip(b["image_id"], b["valid"]) if v)
  assert valid == list(range(100, 107))


def test_eval_fails_on_a_missing_image_naming_it():
  good = _make_source(3)
  source = FakeSource(good.records, good._images, {good.records[1].file_name: "missing"})
  with pytest.raises(RuntimeError, match="img_101.png"):
    list(pipeline.make_eval_batches(source, _input_cfg(), 2))


# --------------------------------------------------------------------------------------------------------------------
# To the devices.
# --------------------------------------------------------------------------------------------------------------------


def test_to_global_batch_on_8_devices():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py sets 8 CPU devices"
  mesh = Mesh(np.array(devices), ("data",))
  batch = next(iter(_loader(_make_source(8), batch=8)))
  out = pipeline.to_global_batch(batch, mesh)
  assert out.keys() == batch.keys()
  for key, value in batch.items():
    arr = out[key]
    # Without jax_enable_x64, image_id's int64 arrives as int32.
    assert arr.shape == value.shape and arr.dtype == jax.dtypes.canonicalize_dtype(value.dtype), key
    assert arr.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), arr.ndim), key
    assert {s.data.shape[0] for s in arr.addressable_shards} == {1}
    for shard in arr.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(value)[shard.index], err_msg=key)
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(value), err_msg=key)

  batch["image_id"] = batch["image_id"] + 2**40
  if not jax.config.jax_enable_x64:
    with pytest.raises(ValueError, match="image_id"):
      pipeline.to_global_batch(batch, mesh)
