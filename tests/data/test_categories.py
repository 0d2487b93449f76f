"""Class names of a model and the check that a dataset's categories fit its labels: names from the config field
model.class_names (what the COCO configs and the trainer set), else from the val set's annotation file; a dataset
with another number of categories than the model has labels is an error naming both counts."""

import json
import pathlib

import pytest

from mrcnn_jax import config_files
from mrcnn_jax.data import categories
from mrcnn_jax.data.categories import class_names_for_config
from mrcnn_jax.data.records import CategoryMap

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(name="mask_rcnn_R50_FPN_1x"):
  return config_files.load_config(str(ROOT / "configs" / f"{name}.py"))


def test_class_names_from_the_config_field():
  names = class_names_for_config(_config())
  assert len(names) == 81 and names[:3] == ["background", "person", "bicycle"] and names[80] == "toothbrush"
  torchvision = class_names_for_config(_config("mask_rcnn_R50_FPN_torchvision"))  # labels are COCO category ids
  assert len(torchvision) == 91 and torchvision[1] == "person" and torchvision[90] == "toothbrush"
  assert [i for i, n in enumerate(torchvision) if n == "N/A"] == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
  assert class_names_for_config(_config("keypoint_rcnn_R50_FPN_1x")) == ["background", "person"]
  assert class_names_for_config(_config("keypoint_rcnn_R50_FPN_torchvision")) == ["background", "person"]
  assert class_names_for_config(_config("shapes")) == ["background", "circle", "square", "triangle"]


def test_class_names_from_the_val_json_else_none(tmp_path):
  config = _config()
  config.model.num_classes = 2
  config.model.class_names = ()
  # The old "dataset name contains coco" guess is gone: a COCO-named dataset without names has none.
  assert config.dataset.name == "coco_2017" and class_names_for_config(config) is None
  val_json = tmp_path / "val.json"
  val_json.write_text(json.dumps({"images": [], "annotations": [], "categories": [
      {"id": 7, "name": "nucleus"}, {"id": 3, "name": "membrane"}]}))
  config.dataset.val_json = str(val_json)
  assert class_names_for_config(config) == ["background", "membrane", "nucleus"]  # by increasing category id
  config.model.class_names = ("a", "b", "c")  # the field first, but only with num_classes names
  assert class_names_for_config(config) == ["background", "membrane", "nucleus"]
  config.model.class_names = ("a", "b")
  assert class_names_for_config(config) == ["background", "a", "b"]


def test_dataset_names_in_each_label_space():
  category_map = CategoryMap.from_coco_categories([{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}])
  assert categories.dataset_class_names(category_map, "contiguous", 2) == ("cat", "dog")
  assert categories.dataset_class_names(category_map, "coco_ids", 6) == ("N/A", "cat", "N/A", "N/A", "dog", "N/A")


def test_a_dataset_with_another_number_of_categories_is_named():
  config = _config()
  config.model.num_classes = 1
  three = CategoryMap.from_coco_categories([{"id": i, "name": n} for i, n in ((4, "a"), (9, "b"), (2, "c"))])
  with pytest.raises(ValueError, match=r"^train.json: the dataset has 3 categories \(c, a, b\), the model has 1 "
                                       r"\(model.num_classes\); set --config.model.num_classes=3$"):
    categories.check_dataset_matches_model(config, three, "train.json")
  config.model.num_classes = 3
  categories.check_dataset_matches_model(config, three, "train.json")
  tv = _config("mask_rcnn_R50_FPN_torchvision")  # label == category id: every id must be a label
  categories.check_dataset_matches_model(tv, three, "x")
  tv.model.num_classes = 8
  with pytest.raises(ValueError, match="category ids go up to 9"):
    categories.check_dataset_matches_model(tv, three, "x")
