"""The tfds `coco_instances` builder against the COCO JSON path: a set prepared from COCO-format files on disk and read
back through `builder_from_directory(...).as_data_source(split)` gives exactly the records `coco.load_coco` gives
(ids, boxes, labels, crowd flags, masks, keypoints, counts) and the same pixels, with TensorFlow never imported."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn_jax.data import coco, shapes, tfds_coco
from mrcnn_jax.data.images import read_image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assert_same_source(got: tfds_coco.TfdsSource, want: coco.CocoSource):
  """Every field of every record, the category map, the counts, the masks decoded and the images decoded."""
  assert got.category_map == want.category_map
  assert got.num_keypoints == want.num_keypoints
  assert got.stats == want.stats
  assert [r.image_id for r in got.records] == [r.image_id for r in want.records]
  for g, w in zip(got.records, want.records):
    assert g.file_name == os.path.relpath(w.file_name, want.image_dir)
    assert (g.height, g.width) == (w.height, w.width)
    for field in ("boxes", "classes", "is_crowd", "annotation_ids"):
      a, b = getattr(g, field), getattr(w, field)
      assert a.dtype == b.dtype and a.shape == b.shape, field
      np.testing.assert_array_equal(a, b, err_msg=f"{field} of image id {g.image_id}")
    assert g.masks == w.masks  # same size lists and the same compressed counts, byte for byte
    if w.masks is not None:
      np.testing.assert_array_equal(coco.decode_masks(g), coco.decode_masks(w))
    if w.keypoints is None:
      assert g.keypoints is None
    else:
      assert g.keypoints.dtype == w.keypoints.dtype
      np.testing.assert_array_equal(g.keypoints, w.keypoints)
    image = got.load_image(g)
    assert image.dtype == np.uint8 and image.shape == (g.height, g.width, 3)
    np.testing.assert_array_equal(image, want.load_image(w))


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  paths = shapes.write_dataset(root / "set", num_train=6, num_val=3, seed=0)
  return root / "set", paths


@pytest.fixture(scope="module")
def shapes_tfds(shapes_set, tmp_path_factory):
  manual_dir, _ = shapes_set
  return tfds_coco.prepare(manual_dir, tmp_path_factory.mktemp("tfds"))


# ---------------------------------------------------------------------------------------------------------------------
# The shapes set through manual_dir.


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("train", [False, True])
def test_shapes_records_equal_json_path(shapes_set, shapes_tfds, split, train):
  _, paths = shapes_set
  want = coco.load_coco(paths[f"{split}_annotations"], paths[f"{split}_images"], train=train)
  got = tfds_coco.load_tfds_source(shapes_tfds, split, train=train)
  assert len(got.records) == {"train": 6, "val": 3}[split]
  assert_same_source(got, want)


def test_prepared_layout_and_lookup(shapes_set, shapes_tfds, tmp_path):
  assert shapes_tfds.parts[-3:] == ("coco_instances", "instances", tfds_coco.VERSION)
  assert sorted(p.name for p in shapes_tfds.glob("*.array_record*")) == [
      "coco_instances-train.array_record-00000-of-00001", "coco_instances-val.array_record-00000-of-00001"]
  # The tfds data_dir finds the same dataset as its own directory.
  assert tfds_coco.dataset_dir(shapes_tfds.parents[2]) == shapes_tfds
  with pytest.raises(FileNotFoundError, match="no prepared coco_instances"):
    tfds_coco.dataset_dir(tmp_path)
  with pytest.raises(ValueError, match=r"split 'test' is not in .*it has \['train', 'val'\]"):
    tfds_coco.load_tfds_source(shapes_tfds, "test", train=False)
  # Preparing again reuses the dataset.
  manual_dir, _ = shapes_set
  assert tfds_coco.prepare(manual_dir, shapes_tfds.parents[2]) == shapes_tfds


def test_source_pickles_for_loader_workers(shapes_set, shapes_tfds):
  _, paths = shapes_set
  source = tfds_coco.load_tfds_source(shapes_tfds, "val", train=False)
  clone = pickle.loads(pickle.dumps(source))
  assert clone._data_source is None  # reopened on first use, in the worker
  record = clone.records[-1]
  np.testing.assert_array_equal(clone.load_image(record), read_image(paths["val_images"] / record.file_name))


def test_prepare_and_read_without_tensorflow(shapes_set, tmp_path):
  """In a fresh interpreter: prepare, read the raw examples through `builder_from_directory(...).as_data_source(split)`
  and check the stored image bytes are the files' bytes; TensorFlow is never imported (whether installed or not:
  tfds imports it lazily, only on the paths that need it)."""
  manual_dir, _ = shapes_set
  script = textwrap.dedent("""
      import os, sys
      import tensorflow_datasets as tfds
      from mrcnn_jax.data import tfds_coco

      manual_dir, data_dir = sys.argv[1:3]
      path = tfds_coco.prepare(manual_dir, data_dir)
      builder = tfds.builder_from_directory(os.fspath(path))
      for split, count in (("train", 6), ("val", 3)):
        raw = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        assert len(raw) == count, (split, len(raw))
        for i in range(count):
          example = raw[i]
          file_name = example["file_name"].decode()
          with open(os.path.join(manual_dir, split, file_name), "rb") as f:
            assert example["image"] == f.read(), file_name  # stored as on disk, not re-encoded
          assert example["image_id"] == i + 1
          assert example["boxes"].dtype.name == "float32" and example["boxes"].shape[1:] == (4,)
        # Decoded by tfds itself (PIL), as a user of the plain data source sees it.
        assert builder.as_data_source(split)[0]["image"].shape == (128, 128, 3)
        source = tfds_coco.load_tfds_source(path, split, train=True)
        source.load_image(source.records[0])
      assert "tensorflow" not in sys.modules
      print("OK")
  """)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", script, str(manual_dir), str(tmp_path / "tfds")], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------------------------
# A set with everything the JSON path handles: category ids with gaps, empty and all-crowd images, uncompressed RLE,
# polygons (one invalid), a box under 1 px, keypoints, and JPEG / RGBA / grayscale image files.


def _uncompressed_counts(rle: dict) -> list[int]:
  """Compressed RLE -> COCO's uncompressed counts: alternating run lengths (zeros first) in column-major order."""
  flat = mask_utils.decode(dict(rle, counts=rle["counts"].encode())).flatten(order="F")
  boundaries = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], boundaries, [flat.size]])).tolist()
  return ([0] if flat[0] else []) + runs


def _edge_case_set(shapes_paths, root):
  """A person_keypoints-style manual_dir built from the shapes train split. Returns (manual_dir, ann file, images)."""
  dataset = json.loads(shapes_paths["train_annotations"].read_text())
  id_map = {1: 1, 2: 5, 3: 90}
  dataset["categories"] = [dict(c, id=id_map[c["id"]], keypoints=["tip", "tail"]) for c in dataset["categories"]]
  images = {im["id"]: im for im in dataset["images"]}
  anns = []
  for ann in dataset["annotations"]:
    ann = dict(ann, category_id=id_map[ann["category_id"]])
    if ann["image_id"] == 1:
      continue  # image 1: no annotation at all
    if ann["image_id"] == 2:
      # image 2: crowd only, as uncompressed RLE (COCO's crowd format)
      im = images[2]
      ann = dict(ann, iscrowd=1, segmentation={"size": [im["height"], im["width"]],
                                               "counts": _uncompressed_counts(ann["segmentation"])})
    anns.append(ann)
  next_id = max(a["id"] for a in dataset["annotations"]) + 1
  anns += [
      # a polygon instance, with one invalid (two-point) polygon removed, and keypoints
      dict(id=next_id, image_id=3, category_id=5, bbox=[10, 20, 30, 25], area=100.0, iscrowd=0,
           segmentation=[[10, 20, 40, 20, 40, 45, 10, 45], [1, 1, 2, 2]],
           keypoints=[12, 22, 2, 38.5, 44, 1]),
      # a box under 1 px wide: dropped and counted
      dict(id=next_id + 1, image_id=3, category_id=1, bbox=[5, 5, 0.5, 10], area=5.0, iscrowd=0,
           segmentation=[[5, 5, 5.5, 5, 5.5, 15, 5, 15]]),
  ]
  dataset["annotations"] = anns

  manual_dir = root / "manual"
  (manual_dir / "annotations").mkdir(parents=True)
  image_dir = manual_dir / "train"
  image_dir.mkdir()
  for im in dataset["images"]:
    pixels = Image.open(shapes_paths["train_images"] / im["file_name"])
    stem = im["file_name"].rsplit(".", 1)[0]
    if im["id"] == 4:
      im["file_name"] = stem + ".jpg"
      pixels.save(image_dir / im["file_name"], quality=85)
    elif im["id"] == 5:
      pixels.convert("RGBA").save(image_dir / im["file_name"])
    elif im["id"] == 6:
      pixels.convert("L").save(image_dir / im["file_name"])
    else:
      pixels.save(image_dir / im["file_name"])
  annotation_file = manual_dir / "annotations" / "person_keypoints_train.json"
  annotation_file.write_text(json.dumps(dataset))
  return manual_dir, annotation_file, image_dir


@pytest.mark.parametrize("train, min_keypoints", [(False, 0), (True, 0), (True, 2)])
def test_edge_cases_equal_json_path(shapes_set, tmp_path, train, min_keypoints):
  _, paths = shapes_set
  manual_dir, annotation_file, image_dir = _edge_case_set(paths, tmp_path)
  with pytest.warns(UserWarning, match="dropped 1 instances"):
    want = coco.load_coco(annotation_file, image_dir, train=train, min_keypoints_per_image=min_keypoints)
  with pytest.warns(UserWarning, match="dropped 1 instances"):  # load_coco's summary, at prepare time
    path = tfds_coco.prepare(manual_dir, tmp_path / "tfds", config="person_keypoints")
  assert path.parts[-2] == "person_keypoints"
  got = tfds_coco.load_tfds_source(tmp_path / "tfds", "train", train=train, config="person_keypoints",
                                   min_keypoints_per_image=min_keypoints)

  assert want.stats["dropped_small_boxes"] == 1 and want.stats["removed_polygons"] == 1
  kept = [r.image_id for r in want.records]
  # Training skips the empty and all-crowd images, and with 2 visible keypoints asked, the images that have fewer
  # (only image 3 has keypoints: 2 visible).
  assert kept == {(False, 0): [1, 2, 3, 4, 5, 6], (True, 0): [3, 4, 5, 6], (True, 2): [3]}[train, min_keypoints]
  assert want.stats["skipped_few_keypoints"] == (3 if min_keypoints else 0)
  assert got.category_map.category_ids == (1, 5, 90) and got.num_keypoints == 2
  if not train:
    assert got.records[1].is_crowd.all() and got.records[0].num_instances == 0
  assert np.any(got.records[kept.index(3)].keypoints[..., 2] > 0)
  assert_same_source(got, want)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input.


def test_explicit_split_files_and_bad_images(shapes_set, tmp_path):
  _, paths = shapes_set
  image_dir = tmp_path / "val"
  image_dir.mkdir()
  for f in paths["val_images"].iterdir():
    (image_dir / f.name).write_bytes(f.read_bytes())
  split_files = {"validation": (paths["val_annotations"], image_dir)}

  # A missing image cannot be stored: preparing fails naming it, and leaves no dataset behind.
  (image_dir / "000002.png").rename(tmp_path / "moved.png")
  with pytest.raises(FileNotFoundError, match=r"000002\.png \(image id 2 of .*instances_val\.json\)"):
    tfds_coco.prepare(split_files, tmp_path / "tfds")
  with pytest.raises(FileNotFoundError):
    tfds_coco.dataset_dir(tmp_path / "tfds")

  # A corrupt image is stored as is and fails when loaded, naming it, as the JSON path's read_image does.
  (image_dir / "000002.png").write_bytes(b"not a png")
  path = tfds_coco.prepare(split_files, tmp_path / "tfds")
  source = tfds_coco.load_tfds_source(path, "validation", train=False)
  assert [r.image_id for r in source.records] == [1, 2, 3]
  with pytest.raises(ValueError, match=r"cannot decode image file 000002\.png \(image id 2, split 'validation'"):
    source.load_image(source.records[1])
  source.load_image(source.records[2])

  with pytest.raises(ValueError, match="split name 'val-2017'"):
    tfds_coco.prepare({"val-2017": split_files["validation"]}, tmp_path / "other")
  with pytest.raises(FileNotFoundError, match="no annotation files"):
    tfds_coco.prepare(tmp_path, tmp_path / "other")
