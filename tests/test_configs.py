"""The config files in configs/: loaded the way the entry points load them, locked, and each variant different from
its base exactly where it means to be. Expected values are Detectron2's and torchvision's published defaults."""

import importlib
import importlib.util
import pathlib
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = "mask_rcnn_R50_FPN_1x"
NAMES = (
    BASE,
    "mask_rcnn_R50_FPN_3x",
    "mask_rcnn_R101_FPN_3x",
    "keypoint_rcnn_R50_FPN_1x",
    "mask_rcnn_R50_FPN_torchvision",
    "keypoint_rcnn_R50_FPN_torchvision",
)
TORCHVISION = ("mask_rcnn_R50_FPN_torchvision", "keypoint_rcnn_R50_FPN_torchvision")

# ml_collections loads config files with the deprecated SourceFileLoader.load_module; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _parse(*args):
  """Parses `args` with a fresh flags object, as `python -m mrcnn_jax.main ARGS` will; returns the config."""
  argv = ["main", *args]
  flag_values = flags.FlagValues()
  # config_flags finds the `--config.a.b=value` overrides in sys.argv unless it is given the arguments.
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.fixture
def in_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # the documented commands run from the repository root with relative paths


def _load(name, arg=""):
  return _parse(f"--config=configs/{name}.py" + (f":{arg}" if arg else ""))


def _flat(config, prefix=""):
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _diff(config, reference):
  a, b = _flat(config), _flat(reference)
  assert a.keys() == b.keys()
  return {k: a[k] for k in a if a[k] != b[k]}


def _module(name):
  spec = importlib.util.spec_from_file_location(f"_test_config_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --- loading and locking ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_loads_through_config_flags_with_an_override(in_root, name):
  config = _parse(f"--config=configs/{name}.py", "--config.model.roi_heads.score_thresh_test=0.1")
  assert config.is_locked
  assert config.model.roi_heads.score_thresh_test == 0.1
  assert isinstance(config.model.roi_heads.score_thresh_test, float)
  assert _load(name).model.roi_heads.score_thresh_test == 0.05


@pytest.mark.parametrize("name", NAMES)
def test_misspelt_override_fails(in_root, name):
  with pytest.raises(AttributeError, match="score_tresh_test"):
    _parse(f"--config=configs/{name}.py", "--config.model.roi_heads.score_tresh_test=0.1")
  config = _load(name)
  with pytest.raises(AttributeError):
    config.model.rpn.nms_tresh = 0.5
  with pytest.raises(AttributeError):
    config.modle = ml_collections.ConfigDict()
  with pytest.raises(TypeError):
    config.model.backbone.depth = "101"


def test_override_of_a_wrong_type_fails(in_root):
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(f"--config=configs/{BASE}.py", "--config.model.backbone.depth=abc")


def test_tuple_and_optional_fields_take_overrides(in_root):
  config = _parse(f"--config=configs/{BASE}.py", "--config.input.min_size_train=(800,)",
                  "--config.model.pooler.impl=pallas", "--config.model.rpn.score_thresh=0.0",
                  "--config.dataset.val_json=/data/coco/annotations/instances_val2017.json")
  assert config.input.min_size_train == (800,)
  assert config.model.pooler.impl == "pallas"
  assert config.model.rpn.score_thresh == 0.0 and isinstance(config.model.rpn.score_thresh, float)
  assert config.dataset.val_json == "/data/coco/annotations/instances_val2017.json"
  # Optional fields are typed placeholders: None by default, and a value of the wrong type is refused.
  base = _load(BASE)
  assert base.model.pooler.impl is None and base.model.rpn.score_thresh is None and base.dataset.train_json is None
  with pytest.raises(TypeError):
    base.model.pooler.impl = 3


@pytest.mark.parametrize("name", NAMES[1:])
def test_variant_loads_by_absolute_path_from_another_directory(tmp_path, monkeypatch, name):
  monkeypatch.chdir(tmp_path)
  config = _parse(f"--config={ROOT / 'configs' / f'{name}.py'}")
  monkeypatch.chdir(ROOT)
  assert config.to_dict() == _load(name).to_dict()


def test_configs_is_a_package(in_root, monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT))
  try:
    module = importlib.import_module("configs.mask_rcnn_R101_FPN_3x")
    assert module.get_config().to_dict() == _load("mask_rcnn_R101_FPN_3x").to_dict()
  finally:
    for key in [k for k in sys.modules if k == "configs" or k.startswith("configs.")]:
      del sys.modules[key]


@pytest.mark.parametrize("name", NAMES)
def test_docstring_says_how_to_run_and_what_to_expect(name):
  doc = _module(name).__doc__
  assert f"--config=configs/{name}.py" in doc
  assert "python -m mrcnn_jax.evaluate" in doc and "python -m mrcnn_jax.main" in doc
  assert "Expected on COCO val2017" in doc


# --- the arg after the colon ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_runlocal_shrinks_the_run_and_leaves_the_model_alone(in_root, name):
  full, local = _load(name), _load(name, "runlocal")
  assert local.is_locked
  changed = set(_diff(local, full))
  assert changed <= {"train.batch_size", "train.base_lr", "train.max_iter", "train.steps", "train.warmup_iters",
                     "train.log_every", "train.checkpoint_every", "train.eval_every", "input.min_size_train",
                     "input.max_size_train", "input.min_size_test", "input.max_size_test", "input.canvases"}
  assert {"train.batch_size", "train.max_iter", "input.canvases"} <= changed
  assert local.train.base_lr / local.train.batch_size == pytest.approx(full.train.base_lr / full.train.batch_size)
  assert local.train.warmup_iters < local.train.steps[0] < local.train.steps[1] < local.train.max_iter


def test_unknown_arg_fails(in_root):
  with pytest.raises(flags.IllegalFlagValueError, match="runlocal"):
    _load("mask_rcnn_R50_FPN_3x", "runlcoal")


# --- values --------------------------------------------------------------------------------------------------------


def test_base_carries_detectron2_defaults(in_root):
  # Detectron2's config defaults and configs/Base-RCNN-FPN.yaml.
  expected = {
      "model.num_classes": 80, "model.label_space": "contiguous",
      "model.backbone.depth": 50, "model.backbone.norm": "FrozenBN", "model.backbone.stride_in_1x1": True,
      "model.backbone.freeze_at": 2, "model.backbone.norm_eps": 1e-5,
      "model.fpn.channels": 256, "model.fpn.min_level": 2, "model.fpn.max_level": 6,
      "model.anchors.sizes": ((32,), (64,), (128,), (256,), (512,)), "model.anchors.aspect_ratios": (0.5, 1.0, 2.0),
      "model.anchors.offset": 0.0, "model.anchors.convention": "detectron2",
      "model.rpn.pre_nms_topk_train": 2000, "model.rpn.post_nms_topk_train": 1000,
      "model.rpn.pre_nms_topk_test": 1000, "model.rpn.post_nms_topk_test": 1000, "model.rpn.nms_thresh": 0.7,
      "model.rpn.min_size": 0.0, "model.rpn.score_thresh": None, "model.rpn.box_weights": (1.0, 1.0, 1.0, 1.0),
      "model.rpn.iou_thresholds": (0.3, 0.7), "model.rpn.iou_labels": (0, -1, 1),
      "model.rpn.batch_size_per_image": 256, "model.rpn.positive_fraction": 0.5,
      "model.rpn.loss_type": "smooth_l1", "model.rpn.smooth_l1_beta": 0.0,
      "model.roi_heads.batch_size_per_image": 512, "model.roi_heads.positive_fraction": 0.25,
      "model.roi_heads.iou_threshold": 0.5, "model.roi_heads.proposal_append_gt": True,
      "model.roi_heads.score_thresh_test": 0.05, "model.roi_heads.nms_thresh_test": 0.5,
      "model.roi_heads.detections_per_image": 100, "model.roi_heads.min_box_size_test": 0.0,
      "model.roi_heads.box_weights": (10.0, 10.0, 5.0, 5.0), "model.roi_heads.fc_dim": 1024,
      "model.roi_heads.smooth_l1_beta": 0.0,
      "model.pooler.aligned": True, "model.pooler.sampling_ratio": 0, "model.pooler.canonical_size": 224,
      "model.pooler.canonical_level": 4, "model.pooler.level_convention": "detectron2",
      "model.pooler.box_resolution": 7, "model.pooler.mask_resolution": 14, "model.pooler.keypoint_resolution": 14,
      "model.mask_head.enabled": True, "model.mask_head.num_convs": 4, "model.mask_head.conv_dim": 256,
      "model.mask_head.paste_mode": "detectron2", "model.mask_head.mask_threshold": 0.5,
      "model.keypoint_head.enabled": False, "model.keypoint_head.num_keypoints": 17,
      "model.keypoint_head.num_convs": 8, "model.keypoint_head.conv_dim": 512,
      "model.keypoint_head.min_visible_per_image": 1, "model.keypoint_head.coordinate_offset": 0.5,
      "model.compute_dtype": "float32",
      "train.skip_nonfinite": False, "train.max_consecutive_nonfinite": 10,
      "input.pixel_format": "BGR", "input.pixel_scale": 255.0, "input.pixel_mean": (103.53, 116.28, 123.675),
      "input.pixel_std": (1.0, 1.0, 1.0), "input.resize_mode": "detectron2",
      "input.min_size_train": (640, 672, 704, 736, 768, 800), "input.max_size_train": 1333,
      "input.min_size_test": 800, "input.max_size_test": 1333, "model.size_divisibility": 32,
      "model.rpn.sigmoid_scores": False, "model.pooler.max_level": 5, "model.pooler.max_sampling_ratio": None,
      "dataset.name": "coco_2017",
      "train.batch_size": 16, "train.base_lr": 0.02, "train.momentum": 0.9, "train.weight_decay": 1e-4,
      "train.weight_decay_norm": 0.0, "train.max_iter": 90000, "train.steps": (60000, 80000), "train.gamma": 0.1,
      "train.warmup_iters": 1000, "train.warmup_factor": 0.001, "train.checkpoint_every": 5000,
  }
  flat = _flat(_load(BASE))
  assert {k: flat[k] for k in expected} == expected
  # COCO's 80 names in contiguous label order: the names of the categories by increasing id.
  names = flat["model.class_names"]
  assert len(names) == 80 and names == tuple(n for n in TV_COCO_NAMES if n != "N/A")
  assert (names[0], names[11], names[79]) == ("person", "stop sign", "toothbrush")


# Each variant against the config it builds on: exactly these fields change, to exactly these values.
TV_EPOCH, TV_KP_EPOCH = 7330, 3500
# torchvision's weights meta (_COCO_CATEGORIES) without "__background__": label == COCO id, "N/A" in the gaps.
TV_COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
VARIANTS = {
    "mask_rcnn_R50_FPN_3x": (BASE, {
        "train.max_iter": 270000, "train.steps": (210000, 250000), "train.eval_every": 270000}),
    "mask_rcnn_R101_FPN_3x": ("mask_rcnn_R50_FPN_3x", {"model.backbone.depth": 101}),
    "keypoint_rcnn_R50_FPN_1x": (BASE, {
        "model.num_classes": 1, "model.class_names": ("person",), "model.rpn.post_nms_topk_train": 1500,
        "model.roi_heads.smooth_l1_beta": 0.5,
        "model.mask_head.enabled": False, "model.keypoint_head.enabled": True}),
    "mask_rcnn_R50_FPN_torchvision": (BASE, {
        "model.num_classes": 90, "model.label_space": "coco_ids", "model.class_names": TV_COCO_NAMES,
        "model.loss_convention": "torchvision",
        "model.backbone.stride_in_1x1": False,
        "model.anchors.convention": "torchvision", "model.rpn.post_nms_topk_train": 2000,
        "model.rpn.min_size": 1e-3, "model.rpn.score_thresh": 0.0, "model.rpn.smooth_l1_beta": 1 / 9,
        "model.roi_heads.min_box_size_test": 1e-2, "model.roi_heads.smooth_l1_beta": 1 / 9,
        "model.pooler.aligned": False, "model.pooler.sampling_ratio": 2, "model.rpn.sigmoid_scores": True,
        "model.pooler.level_convention": "torchvision", "model.mask_head.paste_mode": "torchvision",
        "model.keypoint_head.coordinate_offset": 0.0,
        "input.pixel_format": "RGB", "input.pixel_scale": 1.0, "input.pixel_mean": (0.485, 0.456, 0.406),
        "input.pixel_std": (0.229, 0.224, 0.225), "input.resize_mode": "torchvision", "input.min_size_train": (800,),
        "train.weight_decay_norm": 1e-4, "train.weight_decay_bias": 1e-4, "train.max_iter": 26 * TV_EPOCH,
        "train.steps": (16 * TV_EPOCH, 22 * TV_EPOCH), "train.checkpoint_every": TV_EPOCH,
        "train.eval_every": TV_EPOCH}),
    "keypoint_rcnn_R50_FPN_torchvision": ("mask_rcnn_R50_FPN_torchvision", {
        "model.num_classes": 1, "model.class_names": ("person",), "model.mask_head.enabled": False,
        "model.keypoint_head.enabled": True, "model.keypoint_head.min_visible_per_image": 10,
        "input.min_size_train": (640, 672, 704, 736, 768, 800),
        "train.max_iter": 46 * TV_KP_EPOCH, "train.steps": (36 * TV_KP_EPOCH, 43 * TV_KP_EPOCH),
        "train.checkpoint_every": TV_KP_EPOCH, "train.eval_every": TV_KP_EPOCH}),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_differs_from_its_base_only_where_intended(in_root, name):
  reference, expected = VARIANTS[name]
  assert _diff(_load(name), _load(reference)) == expected


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_configs_carry_torchvision_conventions(in_root, name):
  config = _load(name)
  m, inp = config.model, config.input
  assert m.label_space == "coco_ids" and m.keypoint_head.coordinate_offset == 0.0  # keypoints as COCO has them
  assert not m.backbone.stride_in_1x1 and m.backbone.freeze_at == 2 and m.backbone.norm == "FrozenBN"
  assert m.anchors.convention == "torchvision"
  assert (m.pooler.aligned, m.pooler.sampling_ratio, m.pooler.level_convention) == (False, 2, "torchvision")
  assert m.rpn.score_thresh == 0.0 and m.rpn.min_size == 1e-3 and m.roi_heads.min_box_size_test == 1e-2
  assert m.rpn.smooth_l1_beta == m.roi_heads.smooth_l1_beta == 1 / 9
  assert (m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train, m.rpn.pre_nms_topk_test,
          m.rpn.post_nms_topk_test) == (2000, 2000, 1000, 1000)
  assert (inp.pixel_format, inp.pixel_scale, inp.resize_mode) == ("RGB", 1.0, "torchvision")
  assert (inp.pixel_mean, inp.pixel_std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert (inp.min_size_test, inp.max_size_test) == (800, 1333)


def test_class_counts_match_the_predictors(in_root):
  # torchvision: cls_score has num_classes=91 (mask) / 2 (keypoint) outputs including background; Detectron2: K + 1.
  assert _load("mask_rcnn_R50_FPN_torchvision").model.num_classes + 1 == 91
  assert _load("keypoint_rcnn_R50_FPN_torchvision").model.num_classes + 1 == 2
  assert _load("keypoint_rcnn_R50_FPN_1x").model.num_classes == 1
  for name in ("mask_rcnn_R50_FPN_3x", "mask_rcnn_R101_FPN_3x"):
    assert _load(name).model.num_classes == 80


def test_keypoint_flip_map_swaps_left_and_right(in_root):
  names = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
           "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
           "right_knee", "left_ankle", "right_ankle")  # COCO's person keypoints, in order
  pairs = _load("keypoint_rcnn_R50_FPN_1x").input.keypoint_flip_map
  expected = {(i, names.index("right_" + n[5:])) for i, n in enumerate(names) if n.startswith("left_")}
  assert set(map(tuple, pairs)) == expected


@pytest.mark.parametrize("arg", ["", "runlocal"])
@pytest.mark.parametrize("name", NAMES)
def test_canvases_hold_every_resized_image(in_root, name, arg):
  """Every canvas is a multiple of the model's size_divisibility, and an image of any aspect ratio, resized at the
  largest train or test scale, fits one of them."""
  from mrcnn_jax.data import transforms

  config = _load(name, arg)
  inp, d = config.input, config.model.size_divisibility
  assert all(h % d == 0 and w % d == 0 for h, w in inp.canvases)
  assert max(inp.min_size_train) <= inp.max_size_train and inp.min_size_test <= inp.max_size_test
  for short, cap in ((max(inp.min_size_train), inp.max_size_train), (inp.min_size_test, inp.max_size_test)):
    for h, w in ((100, 100), (300, 400), (400, 300), (200, 1000), (1000, 200), (480, 640), (640, 480)):
      resized = transforms.output_size(h, w, short, cap, inp.resize_mode)
      transforms.choose_canvas(resized, inp.canvases)  # raises if none holds it


# --- the main job's config ----------------------------------------------------------------------------------------------


def test_shapes_config_is_the_base_shrunk_for_a_cpu(in_root):
  shapes, base = _load("shapes"), _load(BASE)
  assert shapes.is_locked and shapes.dataset.name == "shapes"
  assert shapes.model.num_classes == 3 and shapes.input.canvases == ((128, 128),)
  from mrcnn_jax.data import shapes as shapes_data  # pylint: disable=import-outside-toplevel
  assert shapes.model.class_names == shapes_data.CLASSES
  # From scratch: statistics are learned and nothing is frozen.
  assert shapes.model.backbone.norm == "BN" and shapes.model.backbone.freeze_at == 0 and not shapes.init_from
  # Every field of the base exists in the shapes config; it only adds dataset.shapes.
  flat_shapes, flat_base = _flat(shapes), _flat(base)
  assert set(flat_base) < set(flat_shapes)
  assert all(k.startswith("dataset.shapes.") for k in set(flat_shapes) - set(flat_base))
  local = _load("shapes", "runlocal")
  assert local.train.max_iter < shapes.train.max_iter
  assert local.dataset.shapes.num_train < shapes.dataset.shapes.num_train
  assert local.model.to_dict() == shapes.model.to_dict()
  with pytest.raises(flags.IllegalFlagValueError, match="nosuch"):
    _load("shapes", "nosuch")

