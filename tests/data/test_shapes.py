"""The synthetic shapes set: COCO files that pycocotools reads, annotations that agree with their masks, correct
occlusion, determinism, split independence, reuse and regeneration, and the command line."""

import hashlib
import importlib.util
import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_jax.data import shapes

REPO = pathlib.Path(__file__).resolve().parents[2]

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless, and not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _load_script():
  spec = importlib.util.spec_from_file_location("_make_shapes_script", REPO / "scripts" / "make_shapes.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tree_hash(root: pathlib.Path) -> str:
  """sha256 over every file's relative path and bytes (the manifest included)."""
  digest = hashlib.sha256()
  for path in sorted(p for p in root.rglob("*") if p.is_file()):
    digest.update(str(path.relative_to(root)).encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes") / "set"
  return shapes.write_dataset(root, num_train=48, num_val=12, seed=3)


# --------------------------------------------------------------------------------------------------------------------
# The COCO files.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_files_load_and_annotations_match_masks(dataset, split):
  coco = COCO(str(dataset[f"{split}_annotations"]))
  assert sorted(coco.getCatIds()) == list(range(1, len(shapes.CLASSES) + 1))
  assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(shapes.CLASSES)
  image_ids = coco.getImgIds()
  assert len(image_ids) == (48 if split == "train" else 12)
  annotation_ids = set()
  for image_info in coco.loadImgs(image_ids):
    h, w = image_info["height"], image_info["width"]
    image = np.asarray(Image.open(dataset[f"{split}_images"] / image_info["file_name"]))
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"]))
    assert 1 <= len(anns) <= shapes.MAX_INSTANCES
    covered = np.zeros((h, w), np.int32)
    for ann in anns:
      assert ann["id"] not in annotation_ids
      annotation_ids.add(ann["id"])
      assert ann["iscrowd"] == 0
      assert isinstance(ann["segmentation"]["counts"], str)
      assert ann["segmentation"]["size"] == [h, w]
      mask = mask_utils.decode(ann["segmentation"]).astype(bool)
      assert mask.shape == (h, w)  # the RLE covers the image: the mask lies inside it
      assert mask.sum() == ann["area"] >= shapes.MIN_VISIBLE_AREA
      # Oracle for the box: the mask's occupied rows and columns, XYWH with inclusive pixel extents.
      ys, xs = np.nonzero(mask)
      expected_box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
      np.testing.assert_array_equal(ann["bbox"], expected_box)
      np.testing.assert_array_equal(ann["bbox"], mask_utils.toBbox(ann["segmentation"]))
      np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
      covered += mask
    assert covered.max() <= 1  # visible parts of one image never overlap: occlusion is subtracted


def test_all_classes_and_instance_counts_appear(dataset):
  coco = COCO(str(dataset["train_annotations"]))
  per_class = {c: len(coco.getAnnIds(catIds=[c])) for c in coco.getCatIds()}
  assert all(n > 0 for n in per_class.values()), per_class
  counts = {len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()}
  assert min(counts) >= 1 and max(counts) <= shapes.MAX_INSTANCES
  assert len(counts) >= 5  # the number of shapes varies


# --------------------------------------------------------------------------------------------------------------------
# make_image.
# --------------------------------------------------------------------------------------------------------------------


def test_make_image_paints_each_instance_in_its_colour():
  for i in range(20):
    image, instances = shapes.make_image(np.random.default_rng([9, 0, i]), (96, 160))
    assert image.shape == (96, 160, 3) and image.dtype == np.uint8
    assert 1 <= len(instances) <= shapes.MAX_INSTANCES
    for inst in instances:
      assert inst["mask"].shape == (96, 160) and inst["mask"].dtype == bool
      assert inst["area"] == inst["mask"].sum() >= shapes.MIN_VISIBLE_AREA
      assert 1 <= inst["category_id"] <= len(shapes.CLASSES)
      # The visible pixels show the shape's own colour (up to the pixel noise): the mask is what is seen.
      error = np.abs(image[inst["mask"]].astype(np.float32) - np.asarray(inst["color"], np.float32))
      assert np.median(error) <= 3 * shapes.PIXEL_NOISE_STD


def test_visible_parts_are_not_slivers():
  # Occlusion is capped, so a visible part fills a fair share of its own box (a bare triangle fills about half).
  for i in range(30):
    _, instances = shapes.make_image(np.random.default_rng([5, 0, i]))
    for inst in instances:
      _, _, bw, bh = inst["bbox"]
      assert inst["area"] >= 0.2 * bw * bh


def test_make_image_is_a_function_of_the_rng():
  a_image, a_instances = shapes.make_image(np.random.default_rng([1, 2, 3]))
  b_image, b_instances = shapes.make_image(np.random.default_rng([1, 2, 3]))
  np.testing.assert_array_equal(a_image, b_image)
  assert len(a_instances) == len(b_instances)
  for a, b in zip(a_instances, b_instances):
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert a["bbox"] == b["bbox"] and a["category_id"] == b["category_id"]


def test_small_images_are_refused():
  with pytest.raises(ValueError, match="at least"):
    shapes.make_image(np.random.default_rng(0), (32, 128))


# --------------------------------------------------------------------------------------------------------------------
# Determinism, split independence, reuse.
# --------------------------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_val_independent_of_train(tmp_path):
  a = shapes.write_dataset(tmp_path / "a", num_train=10, num_val=6, seed=11)
  b = shapes.write_dataset(tmp_path / "b", num_train=10, num_val=6, seed=11)
  assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
  c = shapes.write_dataset(tmp_path / "c", num_train=3, num_val=6, seed=11)
  assert _tree_hash(a["val_images"]) == _tree_hash(c["val_images"])
  assert a["val_annotations"].read_bytes() == c["val_annotations"].read_bytes()
  # A shorter train split is a prefix of the longer one.
  for name in ("000001.png", "000002.png", "000003.png"):
    assert (a["train_images"] / name).read_bytes() == (c["train_images"] / name).read_bytes()
  d = shapes.write_dataset(tmp_path / "d", num_train=10, num_val=6, seed=12)
  assert a["val_annotations"].read_bytes() != d["val_annotations"].read_bytes()
  assert b  # written alongside; compared through the tree hash


def test_ensure_dataset_reuses_and_regenerates(tmp_path):
  root = tmp_path / "set"
  paths = shapes.ensure_dataset(root, num_train=4, num_val=2, seed=0)
  assert shapes.has_dataset(root, 4, 2, 0)
  stamp = paths["train_annotations"].stat().st_mtime_ns
  marker = root / "train" / "untouched"
  marker.write_text("reused sets are left as they are")
  assert shapes.ensure_dataset(root, num_train=4, num_val=2, seed=0) == paths
  assert marker.exists() and paths["train_annotations"].stat().st_mtime_ns == stamp

  # Other parameters: the set is written again, atomically, with the new manifest.
  paths = shapes.ensure_dataset(root, num_train=5, num_val=2, seed=0)
  assert not marker.exists()
  assert json.loads(paths["manifest"].read_text())["num_train"] == 5
  assert len(json.loads(paths["train_annotations"].read_text())["images"]) == 5
  assert not shapes.has_dataset(root, 4, 2, 0) and shapes.has_dataset(root, 5, 2, 0)
  # No temporary folders are left beside it.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]

  # A set without its manifest is incomplete (e.g. an interrupted copy): it is not reused.
  paths["manifest"].unlink()
  assert not shapes.has_dataset(root, 5, 2, 0)


def test_write_dataset_refuses_a_foreign_directory(tmp_path):
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "precious.txt").write_text("not a shapes set")
  with pytest.raises(FileExistsError, match="not a shapes dataset"):
    shapes.write_dataset(foreign, num_train=1, num_val=1, seed=0)
  assert (foreign / "precious.txt").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# --------------------------------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------------------------------


def test_script_writes_then_reuses(tmp_path, capsys):
  script = _load_script()
  out = tmp_path / "shapes"
  args = ["--out", str(out), "--num-train", "3", "--num-val", "2", "--seed", "1", "--size", "64x96"]
  assert script.main(args) == 0
  assert "wrote" in capsys.readouterr().out
  coco = COCO(str(out / "annotations" / "instances_val.json"))
  assert {(i["height"], i["width"]) for i in coco.loadImgs(coco.getImgIds())} == {(64, 96)}
  assert script.main(args) == 0
  assert "reused" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_info:
    script.main(["--out", str(out), "--num-train", "3", "--num-val", "2", "--size", "16"])
  assert exit_info.value.code == 2
