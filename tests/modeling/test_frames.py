"""Results that do not depend on the canvas: the same image on two canvases, and beside another image of the other
orientation, gets the same features (inside its frame), proposals, detections and training losses.

A small ResNet-50-FPN (width 16) in each of the two conventions (the shipped Detectron2 base and torchvision config,
shrunk), random weights. Set by hand here, because the point is the mechanism, not a peer's numbers: the widths, the
canvases, test sizes that leave the images unresized, score_thresh_test 0 (a random model's scores are low) and,
for the losses, sampling that keeps every candidate (so that both runs draw the same anchors and RoIs). The parity
tests (test_parity_torchvision.py) check the shipped configs unchanged against torchvision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.ops import frames as frame_ops

LANDSCAPE, PORTRAIT = (90, 120), (120, 90)  # frames 96x128 and 128x96
CANVASES = {"own": (96, 128), "larger": (160, 192)}
MIXED_CANVAS = (128, 128)  # holds both orientations


def _config(load_config, name):
  config = load_config(name)
  m = config.model
  m.backbone.width, m.fpn.channels, m.roi_heads.fc_dim, m.mask_head.conv_dim = 16, 32, 64, 16
  m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test, m.roi_heads.detections_per_image = 200, 100, 30
  m.roi_heads.score_thresh_test = 0.0
  inp = config.input
  inp.min_size_test, inp.max_size_test = 90, 120
  inp.pixel_std = (58.395, 57.12, 57.375) if inp.pixel_scale == 255.0 else inp.pixel_std
  inp.canvases = (CANVASES["own"], (128, 96), CANVASES["larger"], MIXED_CANVAS)
  return config


def _on_canvas(images, canvas_hw):
  """Images (unresized, already normalized values) at the top left of one canvas, and their image_info."""
  out = np.zeros((len(images),) + tuple(canvas_hw) + (3,), np.float32)
  info = []
  for i, im in enumerate(images):
    out[i, :im.shape[0], :im.shape[1]] = im
    info.append([im.shape[0], im.shape[1], 1, 1, im.shape[0], im.shape[1]])
  return jnp.asarray(out), jnp.asarray(np.array(info, np.float32))


@pytest.fixture(scope="module", params=["mask_rcnn_R50_FPN_1x", "mask_rcnn_R50_FPN_torchvision"])
def runs(request):
  from conftest import load_config

  config = _config(load_config, request.param)
  variables = mask_rcnn.random_variables(config, 0)  # host-drawn: no init program to compile
  model = mask_rcnn.build_model(config)
  rng = np.random.default_rng(0)
  land, port = rng.standard_normal(LANDSCAPE + (3,)).astype(np.float32), rng.standard_normal(PORTRAIT + (3,))
  port = port.astype(np.float32)

  @jax.jit
  def run(v, images, info):
    frames = model.apply(v, info, method=mask_rcnn.MaskRCNN.frames)
    feats = model.apply(v, images, frames, method=mask_rcnn.MaskRCNN.features)
    return feats, model.apply(v, images, info, method=mask_rcnn.MaskRCNN.infer)

  out = {name: run(variables, *_on_canvas([land], hw)) for name, hw in CANVASES.items()}
  out["mixed"] = run(variables, *_on_canvas([land, port], MIXED_CANVAS))
  # The same features without frames (the whole canvas taken as the frame), on the larger canvas.
  features = jax.jit(lambda v, x: model.apply(v, x, method=mask_rcnn.MaskRCNN.features))
  out["unmasked"] = features(variables, _on_canvas([land], CANVASES["larger"])[0])
  return config, jax.device_get(out)


def test_frame_of_an_image_is_its_size_rounded_up_to_32():
  frames = frame_ops.image_frames(jnp.array([[90.0, 120.0], [800.0, 1066.0], [32.0, 33.0]]), 32)
  np.testing.assert_array_equal(frames, [[96, 128], [800, 1088], [32, 64]])
  np.testing.assert_array_equal(frame_ops.frame_extent(frames, 64), [[2, 2], [13, 17], [1, 1]])


@pytest.mark.parametrize("other", ["larger", "mixed"])
def test_features_inside_the_frame_do_not_depend_on_the_canvas(runs, other):
  _, out = runs
  ref_feats, other_feats = out["own"][0], out[other][0]
  for level in ref_feats:
    ref = ref_feats[level][0]
    h, w = ref.shape[:2]  # the "own" canvas is the frame itself
    np.testing.assert_allclose(other_feats[level][0][:h, :w], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("other", ["larger", "mixed"])
def test_proposals_and_detections_do_not_depend_on_the_canvas(runs, other):
  _, out = runs
  ref, got = out["own"][1], out[other][1]
  for key in ("proposal_valid", "valid", "classes"):
    np.testing.assert_array_equal(got[key][0], ref[key][0], err_msg=key)
  assert ref["proposal_valid"][0].sum() > 50 and ref["valid"][0].sum() > 10
  for key in ("proposals", "boxes", "scores", "masks"):
    np.testing.assert_allclose(got[key][0], ref[key][0], rtol=1e-4, atol=1e-4, err_msg=key)


def test_without_frames_the_padding_changes_the_features(runs):
  """The check above can fail: without frame masking (the whole canvas taken as the frame) the features near the
  frame's edge differ on the larger canvas."""
  _, out = runs
  for level in (3, 4, 5):
    ref = out["own"][0][level][0]
    h, w = ref.shape[:2]
    assert not np.allclose(out["unmasked"][level][0][:h, :w], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max()), level


@pytest.fixture(scope="module")
def loss_runs():
  """Training losses of one batch (a landscape and a portrait image with ground truth) on two canvases."""
  from conftest import load_config

  config = _config(load_config, "mask_rcnn_R50_FPN_torchvision")
  config.model.backbone.depth = 18  # the training graph compiles in a third of R50's time; masking is the same code
  config.model.rpn.batch_size_per_image = 10**6  # keep every candidate: both runs then sample the same set
  config.model.roi_heads.batch_size_per_image = config.model.rpn.post_nms_topk_train + 8
  config.model.roi_heads.positive_fraction = 0.05
  config.model.rpn.pre_nms_topk_train, config.model.rpn.post_nms_topk_train = 300, 100
  config.model.roi_heads.batch_size_per_image = 108
  model = mask_rcnn.build_model(config, train=True)
  variables = mask_rcnn.random_variables(config, 1)
  rng = np.random.default_rng(1)
  images = [rng.standard_normal(LANDSCAPE + (3,)).astype(np.float32),
            rng.standard_normal(PORTRAIT + (3,)).astype(np.float32)]
  g = 4
  gt = {"gt_boxes": np.zeros((2, g, 4), np.float32), "gt_classes": np.zeros((2, g), np.int32),
        "gt_valid": np.zeros((2, g), bool), "gt_is_crowd": np.zeros((2, g), bool),
        "gt_masks": np.zeros((2, g, 28, 28), np.uint8)}
  gt["gt_boxes"][0, :2] = [[10, 12, 60, 70], [70, 5, 118, 40]]
  gt["gt_boxes"][1, :1] = [[20, 30, 80, 110]]
  gt["gt_classes"][0, :2], gt["gt_classes"][1, :1] = [3, 7], [5]
  gt["gt_valid"][0, :2], gt["gt_valid"][1, :1] = True, True
  gt["gt_masks"][gt["gt_valid"]] = 255

  @jax.jit
  def losses(v, images, info):
    batch = dict(gt, image=images, image_info=info)
    return model.apply(v, batch, jax.random.key(0), method=mask_rcnn.MaskRCNN.losses)

  return {hw: jax.device_get(losses(variables, *_on_canvas(images, hw))) for hw in (MIXED_CANVAS, (160, 192))}


def test_training_losses_do_not_depend_on_the_canvas(loss_runs):
  a, b = loss_runs.values()
  assert a["loss_rpn_cls"] > 0 and a["loss_mask"] > 0
  for key in a:
    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
