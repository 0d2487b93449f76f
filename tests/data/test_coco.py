"""The COCO JSON source against hand-written files: boxes, labels and crowd flags as written, masks against bitmaps
drawn by hand, keypoints, what is dropped and counted, and every kind of bad input naming its file or annotation."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn_jax.data import coco as coco_lib
from mrcnn_jax.data.images import read_image
from mrcnn_jax.data.records import ImageRecord

# Ids with gaps, listed out of order: labels follow increasing id (1 -> 1, 3 -> 2, 90 -> 3).
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
H, W = 30, 40


def _rect_polygon(x1, y1, x2, y2):
  return [x1, y1, x2, y1, x2, y2, x1, y2]


def _ann(ann_id, image_id=1, category_id=1, bbox=(2, 3, 10, 5), **fields):
  ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), "iscrowd": 0}
  ann.update(fields)
  return ann


def _image(image_id=1, height=H, width=W, file_name=None):
  return {"id": image_id, "file_name": file_name or f"{image_id:06d}.png", "height": height, "width": width}


def _write(tmp_path, images, annotations, categories=CATEGORIES, write_images=True):
  """Write the JSON (ann.json) and, for each image, an RGB PNG of its size. Returns (annotation file, image dir)."""
  image_dir = tmp_path / "images"
  image_dir.mkdir(exist_ok=True)
  if write_images:
    for image in images:
      Image.new("RGB", (image["width"], image["height"]), (10, 20, 30)).save(image_dir / image["file_name"])
  path = tmp_path / "ann.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
  return path, image_dir


def _load(tmp_path, images, annotations, categories=CATEGORIES, **kwargs):
  path, image_dir = _write(tmp_path, images, annotations, categories)
  kwargs.setdefault("train", False)
  return coco_lib.load_coco(path, image_dir, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Boxes, labels, crowd.


def test_boxes_labels_and_crowd_as_written(tmp_path):
  anns = [
      _ann(11, category_id=3, bbox=(2, 3, 10, 5)),
      _ann(12, category_id=90, bbox=(30, 20, 20, 20), iscrowd=1),  # overshoots the 40x30 image: clipped
      _ann(13, category_id=1, bbox=(0.5, 1.5, 4.25, 2.0)),
  ]
  with pytest.warns(UserWarning, match="clipped 1 boxes"):
    source = _load(tmp_path, [_image(7, file_name="a.png")], [dict(a, image_id=7) for a in anns])
  assert source.category_map.category_ids == (1, 3, 90)
  assert [source.category_map.to_label(c) for c in (1, 3, 90)] == [1, 2, 3]
  (record,) = source.records
  assert isinstance(record, ImageRecord)
  assert (record.image_id, record.height, record.width) == (7, H, W)
  assert record.file_name == str((tmp_path / "images" / "a.png").resolve())
  np.testing.assert_array_equal(record.boxes, np.array([[2, 3, 12, 8], [30, 20, 40, 30], [0.5, 1.5, 4.75, 3.5]],
                                                       np.float32))
  assert record.boxes.dtype == np.float32
  np.testing.assert_array_equal(record.classes, [2, 3, 1])
  assert record.classes.dtype == np.int32
  np.testing.assert_array_equal(record.is_crowd, [False, True, False])
  np.testing.assert_array_equal(record.annotation_ids, [11, 12, 13])
  assert record.masks is None and record.keypoints is None  # boxes only: no segmentation, no keypoint categories
  assert source.stats["crowd"] == 1 and source.stats["instances"] == 3 and source.stats["kept"] == 1


def test_pycocotools_prints_nothing_and_coco_object_holds_the_file(tmp_path, capsys):
  source = _load(tmp_path, [_image(1), _image(2)], [_ann(1)])
  assert capsys.readouterr().out == ""
  assert sorted(source.coco.getImgIds()) == [1, 2]
  assert source.coco.getAnnIds() == [1]


# ---------------------------------------------------------------------------------------------------------------------
# Masks: every segmentation format decodes to the bitmap drawn by hand.


def test_polygon_masks(tmp_path):
  one = _ann(1, bbox=(2, 3, 10, 5), segmentation=[_rect_polygon(2, 3, 12, 8)])
  two = _ann(2, bbox=(1, 1, 35, 25), segmentation=[_rect_polygon(1, 1, 5, 4), _rect_polygon(30, 20, 36, 26)])
  (record,) = _load(tmp_path, [_image()], [one, two]).records
  masks = coco_lib.decode_masks(record)
  expected = np.zeros((2, H, W), np.uint8)
  expected[0, 3:8, 2:12] = 1  # a polygon with corners (x1, y1), (x2, y2) covers rows y1..y2-1, columns x1..x2-1
  expected[1, 1:4, 1:5] = 1
  expected[1, 20:26, 30:36] = 1
  assert masks.shape == (2, H, W) and masks.dtype == np.uint8
  np.testing.assert_array_equal(masks, expected)
  assert all(isinstance(m["counts"], bytes) and m["size"] == [H, W] for m in record.masks)


def test_uncompressed_rle_mask(tmp_path):
  # 3 x 4 image; column-major runs: col 0 = 000, col 1 = 111, col 2 = 100, col 3 = 000 -> 3 zeros, 4 ones, 5 zeros.
  expected = np.array([[0, 1, 1, 0],
                       [0, 1, 0, 0],
                       [0, 1, 0, 0]], np.uint8)
  ann = _ann(1, bbox=(1, 0, 2, 3), iscrowd=1, segmentation={"size": [3, 4], "counts": [3, 4, 5]})
  ann2 = _ann(2, bbox=(0, 0, 4, 3), segmentation=[_rect_polygon(0, 0, 4, 3)])
  (record,) = _load(tmp_path, [_image(1, 3, 4)], [ann, ann2]).records
  masks = coco_lib.decode_masks(record)
  np.testing.assert_array_equal(masks[0], expected)
  np.testing.assert_array_equal(masks[1], np.ones((3, 4), np.uint8))
  assert isinstance(record.masks[0]["counts"], bytes)


def test_compressed_rle_mask(tmp_path):
  expected = np.zeros((H, W), np.uint8)
  expected[5:9, 10:30] = 1
  expected[20:25, 3:6] = 1
  rle = mask_utils.encode(np.asfortranarray(expected))
  segmentation = {"size": [H, W], "counts": rle["counts"].decode("ascii")}  # JSON holds it as a string
  (record,) = _load(tmp_path, [_image()], [_ann(1, bbox=(3, 5, 27, 20), segmentation=segmentation)]).records
  np.testing.assert_array_equal(coco_lib.decode_masks(record), expected[None])


def test_decode_masks_without_instances(tmp_path):
  source = _load(tmp_path, [_image(1), _image(2)], [_ann(1, segmentation=[_rect_polygon(2, 3, 12, 8)])])
  empty = source.records[1]
  assert empty.num_instances == 0 and empty.masks == []
  masks = coco_lib.decode_masks(empty)
  assert masks.shape == (0, H, W) and masks.dtype == np.uint8


@pytest.mark.parametrize("segmentation, match", [
    ({"size": [H + 1, W], "counts": [H * W + W]}, "RLE size"),
    ({"size": [H, W], "counts": [5, 3]}, "summing to"),
    ({"size": [H, W], "counts": "not an rle !!"}, "compressed RLE"),
    ([[1, 2, 3, 4, 5, 6], 7], "list of"),
    ({"polygon": [1, 2, 3]}, "segmentation must be"),
])
def test_malformed_segmentation_names_annotation(tmp_path, segmentation, match):
  with pytest.raises(ValueError, match=f"(?s)annotation id 77.*{match}"):
    _load(tmp_path, [_image()], [_ann(77, segmentation=segmentation)])


# ---------------------------------------------------------------------------------------------------------------------
# Dropped and counted.


def test_invalid_polygons_dropped_and_counted(tmp_path):
  anns = [
      _ann(1, segmentation=[[1, 1, 5, 1]]),  # 2 points only: the instance has no valid polygon left
      _ann(2, segmentation=[[1, 1, 5, 1, 5, 5, 1]], bbox=(1, 1, 4, 4)),  # odd length
      _ann(3, segmentation=[_rect_polygon(2, 3, 12, 8), [0, 0, 1, 1]]),  # one valid, one invalid: the instance stays
  ]
  with pytest.warns(UserWarning, match="2 instances without a valid mask") as caught:
    source = _load(tmp_path, [_image()], anns)
  assert len(caught) == 1
  (record,) = source.records
  np.testing.assert_array_equal(record.annotation_ids, [3])
  expected = np.zeros((1, H, W), np.uint8)
  expected[0, 3:8, 2:12] = 1
  np.testing.assert_array_equal(coco_lib.decode_masks(record), expected)
  assert source.stats["dropped_invalid_polygons"] == 2
  assert source.stats["removed_polygons"] == 3
  assert source.stats["dropped_small_boxes"] == 0


def test_missing_segmentation_in_a_masked_dataset_is_dropped(tmp_path):
  anns = [_ann(1, segmentation=[_rect_polygon(2, 3, 12, 8)]), _ann(2), _ann(3, segmentation=[])]
  with pytest.warns(UserWarning):
    source = _load(tmp_path, [_image()], anns)
  np.testing.assert_array_equal(source.records[0].annotation_ids, [1])
  assert source.stats["dropped_invalid_polygons"] == 2


def test_small_boxes_dropped_with_one_warning(tmp_path):
  anns = [
      _ann(1, bbox=(2, 3, 10, 5)),
      _ann(2, bbox=(2, 3, 0.5, 5)),  # narrower than 1 px
      _ann(3, bbox=(2, 3, 5, 0.9)),  # shorter than 1 px
      _ann(4, bbox=(45, 3, 5, 5)),  # entirely right of the 40 px wide image: clipped to zero width
      _ann(5, image_id=2, bbox=(1, 1, 0, 0)),
  ]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    source = _load(tmp_path, [_image(1), _image(2)], anns)
  ours = [w for w in caught if "dropped" in str(w.message)]
  assert len(ours) == 1 and len(caught) == 1
  message = str(ours[0].message)
  assert "ann.json" in message and "4 instances with a box side under 1.0 px" in message
  assert source.stats["dropped_small_boxes"] == 4
  np.testing.assert_array_equal(source.records[0].annotation_ids, [1])
  assert source.records[1].num_instances == 0


def test_boxes_outside_the_image_are_clipped_and_negative_ones_dropped_in_the_one_warning(tmp_path):
  anns = [
      _ann(1, bbox=(-0.4, 2, 10, 5)),  # 0.4 px left of the image: rounding, clipped without a count
      _ann(2, bbox=(30, 20, 15, 25)),  # 5 px past the right and 15 px past the bottom of the 40x30 image
      _ann(3, bbox=(-6, -3, 10, 8)),  # left of and above the image
      _ann(4, bbox=(10, 5, -4, 6)),  # negative width
      _ann(5, bbox=(10, 5, 4, -2)),  # negative height
      _ann(6, bbox=(2, 3, 0.5, 5)),  # under 1 px: the small-box count, in the same warning
  ]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    source = _load(tmp_path, [_image()], anns)
  assert len(caught) == 1
  message = str(caught[0].message)
  assert message.startswith(str(tmp_path / "ann.json"))
  assert "dropped 2 instances whose box has a negative width or height" in message
  assert "clipped 2 boxes reaching more than 1.0 px outside their image" in message
  assert "dropped 1 instances with a box side under 1.0 px" in message
  assert (source.stats["clipped_boxes"], source.stats["dropped_negative_boxes"]) == (2, 2)
  (record,) = source.records
  np.testing.assert_array_equal(record.annotation_ids, [1, 2, 3])
  # XYWH -> XYXY, then each coordinate clipped to [0, W] x [0, H] by hand.
  np.testing.assert_allclose(record.boxes, [[0, 2, 9.6, 7], [30, 20, W, H], [0, 0, 4, 5]], rtol=1e-6)


def test_min_box_size_is_configurable(tmp_path):
  with pytest.warns(UserWarning, match="1 instances with a box side under 6"):
    source = _load(tmp_path, [_image()], [_ann(1, bbox=(2, 3, 10, 5)), _ann(2, bbox=(2, 3, 10, 6))], min_box_size=6)
  np.testing.assert_array_equal(source.records[0].annotation_ids, [2])


def test_no_warning_when_nothing_is_dropped(tmp_path):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _load(tmp_path, [_image()], [_ann(1, segmentation=[_rect_polygon(2, 3, 12, 8)])])


# ---------------------------------------------------------------------------------------------------------------------
# Keypoints.

KP_CATEGORIES = [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"]}, {"id": 5, "name": "dog"}]


def test_keypoints_parsed(tmp_path):
  kps = [10, 11, 2, 12.5, 13, 1, 0, 0, 0]
  anns = [_ann(1, keypoints=kps, num_keypoints=2), _ann(2, category_id=5)]
  source = _load(tmp_path, [_image(1), _image(2)], anns, KP_CATEGORIES)
  assert source.num_keypoints == 3
  record, empty = source.records
  assert record.keypoints.shape == (2, 3, 3) and record.keypoints.dtype == np.float32
  np.testing.assert_array_equal(record.keypoints[0], [[10, 11, 2], [12.5, 13, 1], [0, 0, 0]])
  np.testing.assert_array_equal(record.keypoints[1], np.zeros((3, 3)))  # the dog has none: all "not labeled"
  assert empty.keypoints.shape == (0, 3, 3)


def test_training_skips_images_with_too_few_visible_keypoints(tmp_path):
  # Visible = visibility > 0 (1: labeled but occluded, 2: visible), summed over the image's instances, as Detectron2
  # and torchvision count them.
  images = [_image(i) for i in (1, 2, 3, 4)]
  anns = [_ann(1, image_id=1, keypoints=[1, 1, 2, 2, 2, 1, 0, 0, 0]),  # 2 visible
          _ann(2, image_id=2, keypoints=[1, 1, 2, 2, 2, 0, 0, 0, 0]),  # 1 visible ...
          _ann(3, image_id=2, keypoints=[5, 5, 1, 6, 6, 0, 0, 0, 0]),  # ... and 1 more in another instance: 2
          _ann(4, image_id=3, keypoints=[0, 0, 0] * 3),  # none visible
          _ann(5, image_id=4, category_id=5)]  # a dog: no keypoints at all
  source = _load(tmp_path, images, anns, KP_CATEGORIES, train=True, min_keypoints_per_image=2)
  assert [r.image_id for r in source.records] == [1, 2]
  assert source.stats["skipped_few_keypoints"] == 2 and source.stats["instances"] == 3
  everything = _load(tmp_path, images, anns, KP_CATEGORIES, train=True)
  assert [r.image_id for r in everything.records] == [1, 2, 3, 4]
  # Evaluation keeps every image whatever the setting: COCOeval scores the file's images.
  evaluation = _load(tmp_path, images, anns, KP_CATEGORIES, train=False, min_keypoints_per_image=2)
  assert [r.image_id for r in evaluation.records] == [1, 2, 3, 4]


def test_num_keypoints_given(tmp_path):
  source = _load(tmp_path, [_image()], [_ann(1, keypoints=[1, 2, 2] * 2)], num_keypoints=2)
  assert source.records[0].keypoints.shape == (1, 2, 3)


def test_keypoints_of_wrong_length_name_the_annotation(tmp_path):
  with pytest.raises(ValueError, match=r"ann\.json: annotation id 4242 .*keypoints has 6 values, expected 3 \* 3"):
    _load(tmp_path, [_image()], [_ann(1, keypoints=[0] * 9), _ann(4242, keypoints=[1, 2, 2, 3, 4, 2])],
          KP_CATEGORIES)


def test_keypoints_without_a_declared_count(tmp_path):
  with pytest.raises(ValueError, match="annotation id 8.*num_keypoints"):
    _load(tmp_path, [_image()], [_ann(8, keypoints=[1, 2, 2])])


# ---------------------------------------------------------------------------------------------------------------------
# Errors in annotations.


def test_unknown_category_names_file_and_annotation(tmp_path):
  with pytest.raises(ValueError, match=r"ann\.json: annotation id 555 .*unknown category id 2"):
    _load(tmp_path, [_image()], [_ann(1), _ann(555, category_id=2)])


@pytest.mark.parametrize("bbox", [(1, 2, 3), ("a", 1, 2, 3), (1, 2, float("nan"), 3)])
def test_malformed_bbox_names_annotation(tmp_path, bbox):
  # json writes a NaN as the literal NaN, which json.loads (and so the loader) reads back as a float.
  with pytest.raises(ValueError, match=r"annotation id 31 .*bbox"):
    _load(tmp_path, [_image()], [_ann(31, bbox=bbox)])


@pytest.mark.parametrize("annotations, match", [
    ([_ann(1), _ann(1)], "annotation id 1 appears twice"),
    ([_ann(3, image_id=99)], "annotation id 3 refers to image id 99"),
    ([{"id": 4, "image_id": 1, "bbox": [0, 0, 2, 2]}], "annotation id 4 has no 'category_id'"),
])
def test_inconsistent_annotations(tmp_path, annotations, match):
  with pytest.raises(ValueError, match=match):
    _load(tmp_path, [_image()], annotations)


# ---------------------------------------------------------------------------------------------------------------------
# Which images are kept.


def _mixed_images(tmp_path, **kwargs):
  images = [_image(1), _image(2), _image(3), _image(4)]
  anns = [
      _ann(1, image_id=1),
      _ann(2, image_id=3, iscrowd=1),  # crowd only: nothing to learn from
      _ann(3, image_id=4, bbox=(1, 1, 0.2, 0.2)),  # its only instance is dropped
  ]  # image 2 has no annotation at all
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return _load(tmp_path, images, anns, **kwargs)


def test_training_skips_images_without_usable_annotations(tmp_path):
  source = _mixed_images(tmp_path, train=True)
  assert [r.image_id for r in source.records] == [1]
  assert source.stats["skipped_empty"] == 3 and source.stats["kept"] == 1 and source.stats["images"] == 4


def test_training_keeps_empty_images_when_asked(tmp_path):
  source = _mixed_images(tmp_path, train=True, skip_empty=False)
  assert [r.image_id for r in source.records] == [1, 2, 3, 4]
  assert source.stats["skipped_empty"] == 0


def test_evaluation_keeps_every_image(tmp_path):
  source = _mixed_images(tmp_path, train=False, skip_empty=True)
  assert [r.image_id for r in source.records] == [1, 2, 3, 4]
  assert [r.num_instances for r in source.records] == [1, 0, 1, 0]
  assert source.stats["kept"] == 4


# ---------------------------------------------------------------------------------------------------------------------
# Bad annotation files and folders.


def test_missing_annotation_file(tmp_path):
  (tmp_path / "images").mkdir()
  with pytest.raises(FileNotFoundError, match="nope.json"):
    coco_lib.load_coco(tmp_path / "nope.json", tmp_path / "images", train=True)


@pytest.mark.parametrize("content",
                         [b"", b"this is not json", b'{"images": [{"id": 1, "file_n', b"\xff\xfe\x00garbage"])
def test_not_json(tmp_path, content):
  path = tmp_path / "broken.json"
  path.write_bytes(content)
  (tmp_path / "images").mkdir()
  with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
    coco_lib.load_coco(path, tmp_path / "images", train=True)


def test_truncated_json(tmp_path):
  path, image_dir = _write(tmp_path, [_image()], [_ann(1)])
  text = path.read_text()
  path.write_text(text[: len(text) // 2])
  with pytest.raises(ValueError, match="ann.json.*not valid JSON"):
    coco_lib.load_coco(path, image_dir, train=True)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_section(tmp_path, key):
  path, image_dir = _write(tmp_path, [_image()], [_ann(1)])
  dataset = json.loads(path.read_text())
  del dataset[key]
  path.write_text(json.dumps(dataset))
  with pytest.raises(ValueError, match=f"ann.json has no '{key}' key"):
    coco_lib.load_coco(path, image_dir, train=True)


def test_json_that_is_not_an_object(tmp_path):
  path = tmp_path / "list.json"
  path.write_text("[1, 2, 3]")
  with pytest.raises(ValueError, match="list.json must hold a JSON object"):
    coco_lib.load_coco(path, tmp_path, train=True)


@pytest.mark.parametrize("key", ["images", "categories"])
def test_empty_section(tmp_path, key):
  path, image_dir = _write(tmp_path, [_image()], [])
  dataset = json.loads(path.read_text())
  dataset[key] = []
  path.write_text(json.dumps(dataset))
  with pytest.raises(ValueError, match=f"ann.json: '{key}' is empty"):
    coco_lib.load_coco(path, image_dir, train=False)


def test_no_annotations_is_fine_for_evaluation(tmp_path):
  source = _load(tmp_path, [_image(1), _image(2)], [])
  assert [r.num_instances for r in source.records] == [0, 0]


def test_missing_image_dir(tmp_path):
  path, _ = _write(tmp_path, [_image()], [_ann(1)], write_images=False)
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    coco_lib.load_coco(path, tmp_path / "no_such_dir", train=True)


# ---------------------------------------------------------------------------------------------------------------------
# Images.


@pytest.mark.parametrize("mode, value, expected, suffix", [
    ("L", 100, (100, 100, 100), "png"),
    ("RGBA", (10, 20, 30, 40), (10, 20, 30), "png"),
    ("LA", (77, 0), (77, 77, 77), "png"),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255), "tif"),  # no ink: white
    ("RGB", (1, 2, 3), (1, 2, 3), "png"),
])
def test_images_load_as_rgb(tmp_path, mode, value, expected, suffix):
  image = _image(1, 5, 7, file_name=f"img.{suffix}")
  path, image_dir = _write(tmp_path, [image], [_ann(1, bbox=(0, 0, 3, 3))], write_images=False)
  Image.new(mode, (7, 5), value).save(image_dir / image["file_name"])
  source = coco_lib.load_coco(path, image_dir, train=True)
  pixels = source.load_image(source.records[0])
  assert pixels.shape == (5, 7, 3) and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, np.broadcast_to(np.array(expected, np.uint8), (5, 7, 3)))


def _png_16_bit(path, samples: np.ndarray) -> None:
  """Write (H, W, C) uint16 samples as a 16-bit PNG (grey, grey + alpha, RGB or RGBA by C), by hand: PIL writes 16-bit
  grey only."""
  import struct
  import zlib

  h, w, c = samples.shape

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
  rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))  # filter type 0 per row
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                   + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", ["gray_png", "gray_tiff", "gray_pgm", "rgb_png", "gray_alpha_png", "rgba_png"])
def test_16_bit_images_read_as_the_8_bit_image_they_were_made_from(tmp_path, kind):
  """16-bit samples v * 256 + (any low byte) read back as v: the full 16-bit range mapped to 8 bits by the high
  byte. Before, PIL's convert("RGB") clipped every grey value above 255 to white."""
  rng = np.random.default_rng(0)
  channels = 1 if kind.startswith("gray") else 3
  image8 = rng.integers(0, 256, (H, W, channels), dtype=np.uint8)
  image8[0, 0] = 255  # the full range
  image8[0, 1] = 0
  samples = image8.astype(np.uint16) * 256 + rng.integers(0, 256, image8.shape, dtype=np.uint16)
  expected = np.repeat(image8, 3, axis=2) if channels == 1 else image8
  suffix = {"tiff": "tif", "pgm": "pgm"}.get(kind.rsplit("_", 1)[1], "png")
  image = _image(1, file_name=f"img.{suffix}")
  path, image_dir = _write(tmp_path, [image], [_ann(1)], write_images=False)
  file = image_dir / image["file_name"]
  if kind in ("gray_tiff", "gray_pgm"):
    Image.fromarray(samples[..., 0]).save(file)
  elif kind == "gray_png":
    _png_16_bit(file, samples)
  else:
    alpha = rng.integers(0, 65536, (H, W, 1), dtype=np.uint16)  # dropped, not composited
    _png_16_bit(file, np.concatenate([samples, alpha], axis=2) if "alpha" in kind or kind == "rgba_png" else samples)
  with Image.open(file) as img:
    assert img.mode in ("I;16", "I;16B", "I", "RGB", "RGBA")  # the 16-bit modes PIL opens these files in
  source = coco_lib.load_coco(path, image_dir, train=True)
  np.testing.assert_array_equal(source.load_image(source.records[0]), expected)
  np.testing.assert_array_equal(read_image(file), expected)  # the decoder predict uses


@pytest.mark.parametrize("mode, dtype", [("I", np.int32), ("F", np.float32)])
def test_32_bit_images_are_refused_naming_the_file_and_the_mode(tmp_path, mode, dtype):
  file = tmp_path / "deep.tif"
  Image.fromarray(np.full((4, 5), 1000, dtype)).save(file)
  with pytest.raises(ValueError, match=rf"image file {file} has 32-bit .* \(PIL mode {mode}\).* 8 or 16 bits"):
    read_image(file)


def test_palette_image_reads_its_colours(tmp_path):
  rgb = np.zeros((H, W, 3), np.uint8)
  rgb[:, 10:] = (200, 30, 40)
  rgb[5:9] = (10, 250, 120)
  Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
  with Image.open(tmp_path / "p.png") as img:
    assert img.mode == "P"
  np.testing.assert_array_equal(read_image(tmp_path / "p.png"), rgb)


def test_a_directory_is_not_an_image(tmp_path):
  with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory, not an image file"):
    read_image(tmp_path)


def test_image_pixels_are_kept_exactly(tmp_path):
  rng = np.random.default_rng(0)
  array = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  path, image_dir = _write(tmp_path, [_image()], [_ann(1)], write_images=False)
  Image.fromarray(array).save(image_dir / "000001.png")
  source = coco_lib.load_coco(path, image_dir, train=True)
  np.testing.assert_array_equal(source.load_image(source.records[0]), array)


def test_corrupt_png_names_the_file(tmp_path):
  path, image_dir = _write(tmp_path, [_image()], [_ann(1)], write_images=False)
  (image_dir / "000001.png").write_bytes(b"\x89PNG garbage bytes, not an image" * 10)
  source = coco_lib.load_coco(path, image_dir, train=True)
  with pytest.raises(ValueError, match="cannot decode image file .*000001.png"):
    source.load_image(source.records[0])


def test_truncated_png_names_the_file(tmp_path):
  path, image_dir = _write(tmp_path, [_image()], [_ann(1)], write_images=False)
  noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)  # incompressible: data spans the file
  Image.fromarray(noise).save(image_dir / "full.png")
  data = (image_dir / "full.png").read_bytes()
  (image_dir / "000001.png").write_bytes(data[: len(data) // 2])
  source = coco_lib.load_coco(path, image_dir, train=True)
  with pytest.raises(ValueError, match="000001.png"):
    source.load_image(source.records[0])


def test_missing_image_names_the_file(tmp_path):
  path, image_dir = _write(tmp_path, [_image(1), _image(2)], [_ann(1), _ann(2, image_id=2)])
  (image_dir / "000002.png").unlink()
  source = coco_lib.load_coco(path, image_dir, train=True)  # loading the annotations does not touch the images
  source.load_image(source.records[0])
  with pytest.raises(FileNotFoundError, match="000002.png"):
    source.load_image(source.records[1])
  with pytest.raises(FileNotFoundError, match=r"1 of 2 image files .* missing: .*000002.png"):
    source.check_images()


def test_check_images_decodes_when_asked(tmp_path):
  path, image_dir = _write(tmp_path, [_image(1), _image(2)], [])
  (image_dir / "000002.png").write_bytes(b"garbage")
  source = coco_lib.load_coco(path, image_dir, train=False)
  source.check_images()  # every file exists
  with pytest.raises(ValueError, match="000002.png"):
    source.check_images(decode=True)


def test_image_of_another_size_names_the_file(tmp_path):
  path, image_dir = _write(tmp_path, [_image()], [_ann(1)], write_images=False)
  Image.new("RGB", (W, H + 1)).save(image_dir / "000001.png")
  source = coco_lib.load_coco(path, image_dir, train=True)
  with pytest.raises(ValueError, match=f"000001.png decodes to height x width {H + 1} x {W}.* says {H} x {W}"):
    source.load_image(source.records[0])


def test_pickled_source_leaves_the_coco_index_behind(tmp_path):
  import pickle

  from mrcnn_jax.data import shapes

  paths = shapes.write_dataset(tmp_path / "shapes", 2, 1, seed=0)
  source = coco_lib.load_coco(paths["train_annotations"], paths["train_images"], train=True)
  copy = pickle.loads(pickle.dumps(source))
  assert source.coco is not None and copy.coco is None
  assert [r.image_id for r in copy.records] == [r.image_id for r in source.records]
  np.testing.assert_array_equal(copy.load_image(copy.records[0]), source.load_image(source.records[0]))
