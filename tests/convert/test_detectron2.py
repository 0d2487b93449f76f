"""Detectron2 and MSRA (Caffe2) checkpoints -> mrcnn_jax variables.

Detectron2 cannot be installed here, so the checkpoints are built in the test from Detectron2's names and torch
layouts (model zoo mask_rcnn_R_50_FPN / keypoint_rcnn_R_50_FPN / mask_rcnn_R_101_FPN, MSRA R-50.pkl), written as
.pkl files the way the model zoo stores them, and read back through `load_pickle`. The class re-ordering is checked on
the converted arrays against values written by hand, not through the converter's helpers.
"""

import functools
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.convert import detectron2 as d2
from mrcnn_jax.convert.common import check_against
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.modeling.layers import FrozenBatchNorm

from conftest import load_config  # tests/conftest.py, on sys.path through pytest's rootdir conftest

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # bottleneck blocks in res2..res5
WIDTHS = (64, 128, 256, 512)  # bottleneck widths; a stage outputs 4x as many channels
K = 80  # COCO foreground classes


@functools.lru_cache(maxsize=None)
def expected_shapes(config_name):
  config = load_config(config_name)
  return jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))


def _filler(rng):
  """Random weights scaled so that activations stay O(1) through 50+ layers (He init, BN statistics near 1), or
  zeros when rng is None (shape-only checks)."""
  if rng is None:
    return lambda shape, fan_in=1, kind="w": np.zeros(shape, np.float32)

  def fill(shape, fan_in=1, kind="w"):
    if kind == "w":
      return (rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if kind == "scale":
      return rng.uniform(0.5, 1.0, shape).astype(np.float32)
    if kind == "var":
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (rng.standard_normal(shape, np.float32) * 0.1).astype(np.float32)  # biases, means

  return fill


def detectron2_state(rng, depth=50, num_classes=K, mask=True, keypoint_convs=0, num_keypoints=17):
  """A Detectron2 GeneralizedRCNN state dict (ResNet-FPN) in torch layouts: name -> float32 array."""
  fill = _filler(rng)
  s = {}

  def conv(name, out, inp, k, bias=True, norm=False):
    s[f"{name}.weight"] = fill((out, inp, k, k), inp * k * k)
    if bias:
      s[f"{name}.bias"] = fill((out,), kind="b")
    if norm:
      s[f"{name}.norm.weight"] = fill((out,), kind="scale")
      s[f"{name}.norm.bias"] = fill((out,), kind="b")
      s[f"{name}.norm.running_mean"] = fill((out,), kind="b")
      s[f"{name}.norm.running_var"] = fill((out,), kind="var")

  def linear(name, out, inp):
    s[f"{name}.weight"] = fill((out, inp), inp)
    s[f"{name}.bias"] = fill((out,), kind="b")

  conv("backbone.bottom_up.stem.conv1", 64, 3, 7, bias=False, norm=True)
  inp = 64
  for level, n, width in zip((2, 3, 4, 5), BLOCKS[depth], WIDTHS):
    for i in range(n):
      block = f"backbone.bottom_up.res{level}.{i}"
      if i == 0:
        conv(f"{block}.shortcut", 4 * width, inp, 1, bias=False, norm=True)
      conv(f"{block}.conv1", width, inp, 1, bias=False, norm=True)
      conv(f"{block}.conv2", width, width, 3, bias=False, norm=True)
      conv(f"{block}.conv3", 4 * width, width, 1, bias=False, norm=True)
      inp = 4 * width
  for level, width in zip((2, 3, 4, 5), WIDTHS):
    conv(f"backbone.fpn_lateral{level}", 256, 4 * width, 1)
    conv(f"backbone.fpn_output{level}", 256, 256, 3)
  conv("proposal_generator.rpn_head.conv", 256, 256, 3)
  conv("proposal_generator.rpn_head.objectness_logits", 3, 256, 1)
  conv("proposal_generator.rpn_head.anchor_deltas", 12, 256, 1)
  # Small deltas keep proposals and boxes near their anchors, so that the forward pass returns detections.
  s["proposal_generator.rpn_head.anchor_deltas.weight"] *= 1e-3
  linear("roi_heads.box_head.fc1", 1024, 256 * 7 * 7)
  linear("roi_heads.box_head.fc2", 1024, 1024)
  linear("roi_heads.box_predictor.cls_score", num_classes + 1, 1024)  # background last
  linear("roi_heads.box_predictor.bbox_pred", 4 * num_classes, 1024)  # no background deltas
  s["roi_heads.box_predictor.bbox_pred.weight"] *= 1e-3
  if mask:
    for i in range(1, 5):
      conv(f"roi_heads.mask_head.mask_fcn{i}", 256, 256, 3)
    s["roi_heads.mask_head.deconv.weight"] = fill((256, 256, 2, 2), 256 * 4)  # ConvTranspose2d (in, out, kh, kw)
    s["roi_heads.mask_head.deconv.bias"] = fill((256,), kind="b")
    conv("roi_heads.mask_head.predictor", num_classes, 256, 1)
  for i in range(1, keypoint_convs + 1):
    conv(f"roi_heads.keypoint_head.conv_fcn{i}", 512, 256 if i == 1 else 512, 3)
  if keypoint_convs:
    s["roi_heads.keypoint_head.score_lowres.weight"] = fill((512, num_keypoints, 4, 4), 512 * 16)
    s["roi_heads.keypoint_head.score_lowres.bias"] = fill((num_keypoints,), kind="b")
  return s


def write_pkl(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=protocol)
  return path


def run_forward(config, variables):
  """One 128x128 image through the jitted inference program; a shrunken proposal/detection budget keeps it quick."""
  config.model.rpn.pre_nms_topk_test = 200
  config.model.rpn.post_nms_topk_test = 100
  config.model.roi_heads.detections_per_image = 20
  images = jnp.asarray(np.random.default_rng(0).standard_normal((1, 128, 128, 3), np.float32) * 50)
  info = jnp.asarray(np.array([[128, 128, 1, 1, 128, 128]], np.float32))
  out = jax.tree.map(np.asarray, mask_rcnn.build_infer(config)(variables, images, info))
  d = 20
  assert out["boxes"].shape == (1, d, 4) and out["scores"].shape == (1, d)
  assert out["classes"].shape == (1, d) and out["valid"].shape == (1, d)
  valid = out["valid"][0]
  assert valid.any(), "the test needs detections, so that the mask / keypoint heads run on real boxes"
  for name, value in out.items():
    if value.shape[:2] == (1, d):  # per detection: padding slots hold no detection and are not looked at
      value = value[0][valid]
    assert np.all(np.isfinite(value)), f"{name} has non-finite values"
  return out


@pytest.fixture(scope="module")
def r50_state():
  return detectron2_state(np.random.default_rng(0))


# -- whole models from .pkl -------------------------------------------------------------------------------------------


def test_mask_rcnn_r50_pkl_converts_and_runs(tmp_path, r50_state):
  state = dict(r50_state)
  state["pixel_mean"] = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
  state["pixel_std"] = np.ones((3, 1, 1), np.float32)
  state["proposal_generator.anchor_generator.cell_anchors.0"] = np.zeros((3, 4), np.float32)  # old checkpoints
  path = write_pkl(tmp_path / "model_final_a54504.pkl",
                   {"model": state, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True})
  loaded = d2.load_pickle(path)
  assert sorted(loaded) == sorted(state)
  variables, extras = d2.convert_state_dict(loaded, return_extras=True)  # raises if any key is left over
  check_against(variables, expected_shapes("mask_rcnn_R50_FPN_1x"), "detectron2")
  np.testing.assert_array_equal(extras["pixel_mean"], np.float32([103.53, 116.28, 123.675]))
  np.testing.assert_array_equal(extras["pixel_std"], [1.0, 1.0, 1.0])
  assert extras["dropped"] == ["proposal_generator.anchor_generator.cell_anchors.0"]
  # Layouts, checked on single elements: conv (out, in, kh, kw) -> (kh, kw, in, out); FrozenBN names.
  w = state["backbone.bottom_up.res3.1.conv2.weight"]
  np.testing.assert_array_equal(variables["params"]["backbone"]["res3_1"]["conv2"]["kernel"][2, 0, 5, 7],
                                w[7, 5, 2, 0])
  np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["res3_1"]["norm2"]["var"],
                                state["backbone.bottom_up.res3.1.conv2.norm.running_var"])
  out = run_forward(load_config("mask_rcnn_R50_FPN_1x"), variables)
  assert out["masks"].shape == (1, 20, 28, 28)


def test_keypoint_rcnn_r50_pkl_converts_and_runs(tmp_path):
  state = detectron2_state(np.random.default_rng(1), num_classes=1, mask=False, keypoint_convs=8)
  # Scores of one class saturate with random weights; lift the person logit so that boxes pass the threshold.
  state["roi_heads.box_predictor.cls_score.weight"] *= 1e-4
  state["roi_heads.box_predictor.cls_score.bias"][:] = [4.0, 0.0]  # [person, background]
  path = write_pkl(tmp_path / "model_final_04e291.pkl", {"model": state, "__author__": "Detectron2 Model Zoo"})
  variables = d2.convert_state_dict(d2.load_pickle(path))
  check_against(variables, expected_shapes("keypoint_rcnn_R50_FPN_1x"), "detectron2")
  # One class: logits [background, person] from Detectron2's rows [person, background].
  cls_w = state["roi_heads.box_predictor.cls_score.weight"]
  np.testing.assert_array_equal(variables["params"]["box_head"]["cls_score"]["kernel"], cls_w[[1, 0]].T)
  np.testing.assert_array_equal(variables["params"]["box_head"]["cls_score"]["bias"], [0.0, 4.0])
  out = run_forward(load_config("keypoint_rcnn_R50_FPN_1x"), variables)
  assert out["keypoints"].shape == (1, 20, 17, 3)


def test_mask_rcnn_r101_pkl_fits_the_model(tmp_path):
  state = detectron2_state(None, depth=101)
  path = write_pkl(tmp_path / "model_final_a3ec72.pkl", {"model": state, "__author__": "Detectron2 Model Zoo"})
  variables = d2.convert_state_dict(d2.load_pickle(path))
  check_against(variables, expected_shapes("mask_rcnn_R101_FPN_3x"), "detectron2")
  assert len(variables["params"]["backbone"]) == 1 + sum(BLOCKS[101])


# -- class layout -----------------------------------------------------------------------------------------------------


def test_classes_move_background_to_index_0(r50_state):
  state = dict(r50_state)
  # Detectron2 rows hold recognizable constants: cls_score row r (r = K is background) -> r; bbox_pred row 4j + d
  # (class j in 0..K-1, coordinate d) -> 10 j + d + 1; mask predictor channel j -> j + 1.
  state["roi_heads.box_predictor.cls_score.weight"] = np.repeat(np.arange(K + 1, dtype=np.float32)[:, None], 1024, 1)
  state["roi_heads.box_predictor.cls_score.bias"] = np.arange(K + 1, dtype=np.float32)
  box_rows = np.array([10 * j + d + 1 for j in range(K) for d in range(4)], np.float32)
  state["roi_heads.box_predictor.bbox_pred.weight"] = np.repeat(box_rows[:, None], 1024, 1)
  state["roi_heads.box_predictor.bbox_pred.bias"] = box_rows
  state["roi_heads.mask_head.predictor.weight"] = np.broadcast_to(
      np.arange(1, K + 1, dtype=np.float32)[:, None, None, None], (K, 256, 1, 1)).copy()
  state["roi_heads.mask_head.predictor.bias"] = np.arange(1, K + 1, dtype=np.float32)
  params = d2.convert_state_dict(state)["params"]

  # Ours: logit 0 = background = Detectron2's last row (K); logit c = Detectron2's row c - 1.
  want_logits = np.array([K] + [c - 1 for c in range(1, K + 1)], np.float32)
  np.testing.assert_array_equal(params["box_head"]["cls_score"]["kernel"], np.broadcast_to(want_logits, (1024, K + 1)))
  np.testing.assert_array_equal(params["box_head"]["cls_score"]["bias"], want_logits)
  assert params["box_head"]["cls_score"]["bias"][0] == 80 and params["box_head"]["cls_score"]["bias"][1] == 0

  # Ours: deltas 4c + d; the background slot (c = 0) is zero, class c reads Detectron2's class c - 1.
  want_deltas = np.array([0.0] * 4 + [10 * (c - 1) + d + 1 for c in range(1, K + 1) for d in range(4)], np.float32)
  np.testing.assert_array_equal(params["box_head"]["bbox_pred"]["kernel"],
                                np.broadcast_to(want_deltas, (1024, 4 * (K + 1))))
  np.testing.assert_array_equal(params["box_head"]["bbox_pred"]["bias"], want_deltas)
  np.testing.assert_array_equal(params["box_head"]["bbox_pred"]["bias"][:9], [0, 0, 0, 0, 1, 2, 3, 4, 11])

  # Ours: mask channel 0 (background) is zero, channel c is Detectron2's channel c - 1 (which holds c).
  want_masks = np.arange(K + 1, dtype=np.float32)
  np.testing.assert_array_equal(params["mask_head"]["predictor"]["kernel"],
                                np.broadcast_to(want_masks, (1, 1, 256, K + 1)))
  np.testing.assert_array_equal(params["mask_head"]["predictor"]["bias"], want_masks)


# -- errors -----------------------------------------------------------------------------------------------------------


def test_extra_key_is_an_error_naming_it(r50_state):
  state = dict(r50_state, **{"roi_heads.box_head.fc3.weight": np.zeros((4, 4), np.float32)})
  with pytest.raises(ValueError, match=re.escape("roi_heads.box_head.fc3.weight")):
    d2.convert_state_dict(state)


def test_missing_key_is_an_error_naming_it(r50_state):
  key = "backbone.bottom_up.res3.2.conv2.norm.running_var"
  state = {k: v for k, v in r50_state.items() if k != key}
  with pytest.raises(KeyError, match=re.escape(key)):
    d2.convert_state_dict(state)


@pytest.mark.parametrize("key, shape", [
    ("backbone.fpn_output3.weight", (256, 256, 1, 1)),
    ("backbone.bottom_up.res4.5.conv1.weight", (256, 1024, 3, 3)),
    ("roi_heads.box_predictor.bbox_pred.weight", (4 * (K + 1), 1024)),  # a background-first layout
    ("roi_heads.mask_head.predictor.bias", (K + 1,)),
])
def test_wrong_shape_is_an_error_naming_the_key(r50_state, key, shape):
  state = dict(r50_state, **{key: np.zeros(shape, np.float32)})
  with pytest.raises(ValueError, match=re.escape(key) + ".*" + re.escape(str(shape))):
    d2.convert_state_dict(state)


def test_load_pickle_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.pkl"):
    d2.load_pickle(tmp_path / "nothere.pkl")
  (tmp_path / "text.pkl").write_text("not a pickle")
  with pytest.raises(ValueError, match="text.pkl.*not a pickle"):
    d2.load_pickle(tmp_path / "text.pkl")
  with pytest.raises(ValueError, match="empty.pkl.*no weights"):
    d2.load_pickle(write_pkl(tmp_path / "empty.pkl", {"model": {}, "__author__": "nobody"}))
  with pytest.raises(ValueError, match="meta.pkl.*no weights"):
    d2.load_pickle(write_pkl(tmp_path / "meta.pkl", {"__author__": "nobody"}))
  # A pickle that would build something other than numpy arrays is refused before it runs.
  import fractions

  with pytest.raises(ValueError, match="other.pkl.*fractions.Fraction"):
    d2.load_pickle(write_pkl(tmp_path / "other.pkl", {"model": {"w": fractions.Fraction(1, 3)}}))


# -- MSRA ImageNet backbones ------------------------------------------------------------------------------------------


def msra_blobs(rng, depth=50):
  """Caffe2 names and layouts of the MSRA ResNet (R-50.pkl): AffineChannel norms (scale _s, bias _b)."""
  blobs = {"conv1_w": rng.standard_normal((64, 3, 7, 7), np.float32),
           "res_conv1_bn_s": rng.uniform(0.5, 2, 64).astype(np.float32),
           "res_conv1_bn_b": rng.standard_normal(64, np.float32)}
  inp = 64
  for level, n, width in zip((2, 3, 4, 5), BLOCKS[depth], WIDTHS):
    for i in range(n):
      convs = {"branch2a": (width, inp, 1), "branch2b": (width, width, 3), "branch2c": (4 * width, width, 1)}
      if i == 0:
        convs["branch1"] = (4 * width, inp, 1)
      for branch, (out, cin, k) in convs.items():
        name = f"res{level}_{i}_{branch}"
        blobs[f"{name}_w"] = rng.standard_normal((out, cin, k, k), np.float32)
        blobs[f"{name}_bn_s"] = rng.uniform(0.5, 2, out).astype(np.float32)
        blobs[f"{name}_bn_b"] = rng.standard_normal(out, np.float32)
      inp = 4 * width
  blobs["fc1000_w"] = rng.standard_normal((1000, 2048), np.float32)
  blobs["fc1000_b"] = rng.standard_normal(1000, np.float32)
  return blobs


@pytest.fixture(scope="module")
def msra_r50(tmp_path_factory):
  blobs = msra_blobs(np.random.default_rng(2))
  # The MSRA files are flat dicts, pickled by Python 2 (protocol 2).
  path = write_pkl(tmp_path_factory.mktemp("msra") / "R-50.pkl", blobs, protocol=2)
  loaded = d2.load_pickle(path)
  assert sorted(loaded) == sorted(blobs)
  return blobs, d2.convert_msra_backbone(loaded, 50, return_extras=True)


def test_msra_backbone_fits_the_model(msra_r50):
  blobs, (variables, extras) = msra_r50
  want = expected_shapes("mask_rcnn_R50_FPN_1x")
  check_against(variables, {c: {"backbone": want[c]["backbone"]} for c in ("params", "batch_stats")}, "msra")
  assert extras["dropped"] == ["fc1000_b", "fc1000_w"]
  np.testing.assert_array_equal(variables["params"]["backbone"]["stem_conv"]["kernel"][6, 1, 2, 9],
                                blobs["conv1_w"][9, 2, 6, 1])
  np.testing.assert_array_equal(variables["params"]["backbone"]["res5_0"]["shortcut_conv"]["kernel"][0, 0],
                                blobs["res5_0_branch1_w"][:, :, 0, 0].T)
  stats = variables["batch_stats"]["backbone"]["res4_3"]["norm2"]
  np.testing.assert_array_equal(stats["scale"], blobs["res4_3_branch2b_bn_s"])
  np.testing.assert_array_equal(stats["bias"], blobs["res4_3_branch2b_bn_b"])


def test_msra_affine_channel_is_exact_as_frozen_bn(msra_r50):
  """FrozenBN with the converted statistics computes the AffineChannel x * s + b bit for bit."""
  blobs, (variables, _) = msra_r50
  for block, norm, name in (("stem_norm", None, "res_conv1_bn"), ("res3_1", "norm2", "res3_1_branch2b_bn"),
                            ("res2_0", "shortcut_norm", "res2_0_branch1_bn")):
    stats = variables["batch_stats"]["backbone"][block]
    stats = stats if norm is None else stats[norm]
    s, b = blobs[f"{name}_s"], blobs[f"{name}_b"]
    x = np.random.default_rng(3).standard_normal((2, 3, 5, s.shape[0]), np.float32) * 10
    y = FrozenBatchNorm(eps=1e-5).apply({"batch_stats": stats}, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), x * s + b)


def test_msra_depth_mismatch_names_the_missing_block(msra_r50):
  blobs, _ = msra_r50
  with pytest.raises(KeyError, match="res4_6_branch2a_w"):
    d2.convert_msra_backbone(blobs, 101)
  with pytest.raises(ValueError, match="res2_0_branch2a_w.*shape"):
    d2.convert_msra_backbone(dict(blobs, res2_0_branch2a_w=np.zeros((64, 64, 3, 3), np.float32)), 50)
