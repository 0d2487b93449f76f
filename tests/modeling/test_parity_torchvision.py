"""Parity with torchvision: its Mask R-CNN and Keypoint R-CNN, with random weights converted to mrcnn_jax, give the
same FPN features, proposals, detections, masks and keypoints on the same images.

torchvision runs with a small input size (min_size 320) to keep the test quick; both models see torchvision's own
transformed, padded batch of two images of different sizes, so the test covers batching with ragged valid sizes.
Detections are compared after IoU matching, not by index, since near-ties may swap the order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.convert import torchvision as tv_convert
from mrcnn_jax.convert.common import check_against
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import masks as mask_ops

torch = pytest.importorskip("torch", reason="torchvision is the parity oracle; install the `parity` extra")
torchvision = pytest.importorskip("torchvision", reason="torchvision is the parity oracle")


def _spread_weights(model, seed, images):
  """Random BatchNorm statistics and a classifier spread so that scores are neither tied nor saturated and the model
  returns many detections over several classes.

  Built without pretrained weights, torchvision's backbone uses nn.BatchNorm2d (in eval mode it computes what
  FrozenBatchNorm2d does). Its affine parameters are drawn at random, and its statistics are set to those of the
  test images layer by layer (one forward pass with momentum 1), so that activations keep a trained network's scale
  through the 50 layers rather than vanishing or exploding.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    norms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for mod in norms:
      c = mod.weight.shape[0]
      mod.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
      mod.bias.copy_(torch.randn(c, generator=g) * 0.2)
      mod.momentum = 1.0
      mod.train()
    image_list, _ = model.transform([torch.tensor(im) for im in images])
    model.backbone.body(image_list.tensors)
    for mod in norms:
      mod.eval()
    model.rpn.head.bbox_pred.weight.mul_(0.1)
    predictor = model.roi_heads.box_predictor
    predictor.cls_score.weight.mul_(10.0)
    predictor.cls_score.bias.copy_(torch.randn(predictor.cls_score.bias.shape, generator=g))


def _run_both(tv_model, config, images):
  """Run torchvision stage by stage and mrcnn_jax's `infer` on torchvision's transformed batch."""
  with torch.no_grad():
    image_list, _ = tv_model.transform([torch.tensor(im) for im in images])
    feats = tv_model.backbone(image_list.tensors)
    proposals, _ = tv_model.rpn(image_list, feats)
    detections, _ = tv_model.roi_heads(feats, proposals, image_list.image_sizes)
  variables = tv_convert.convert_state_dict({k: v.numpy() for k, v in tv_model.state_dict().items()})
  model = mask_rcnn.MaskRCNN(config.model)
  check_against(variables, jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0))), "torchvision")
  batch = jnp.asarray(image_list.tensors.permute(0, 2, 3, 1).numpy())
  info = jnp.asarray(np.array([[h, w, 1, 1, h, w] for h, w in image_list.image_sizes], np.float32))
  ours_feats = jax.jit(lambda v, x: model.apply(v, x, method=mask_rcnn.MaskRCNN.features))(variables, batch)
  out = mask_rcnn.build_infer(config)(variables, batch, info)
  torch_side = {"feats": feats, "proposals": proposals, "detections": detections, "sizes": image_list.image_sizes}
  return torch_side, jax.tree.map(np.asarray, ours_feats), jax.tree.map(np.asarray, out)


def _match(ours_boxes, theirs_boxes):
  """Index into `theirs` of each of ours by best IoU, and that IoU."""
  iou = np.asarray(box_ops.box_iou(jnp.asarray(ours_boxes), jnp.asarray(theirs_boxes)))
  return iou.argmax(1), iou.max(1)


@pytest.fixture(scope="module")
def mask_rcnn_run():
  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, min_size=320, max_size=512).eval()
  rng = np.random.default_rng(0)
  images = [rng.random((3, 480, 640), np.float32), rng.random((3, 600, 400), np.float32)]
  _spread_weights(model, 1, images)
  from conftest import load_config

  return _run_both(model, load_config("torchvision_maskrcnn_r50_fpn"), images)


def test_fpn_features(mask_rcnn_run):
  theirs, ours, _ = mask_rcnn_run
  for i, name in enumerate(["0", "1", "2", "3", "pool"]):
    want = theirs["feats"][name].permute(0, 2, 3, 1).numpy()
    got = ours[i + 2]
    assert got.shape == want.shape
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, f"P{i + 2}: max relative difference {rel}"


def test_rpn_proposals(mask_rcnn_run):
  theirs, _, out = mask_rcnn_run
  for i, want in enumerate(theirs["proposals"]):
    want = want.numpy()
    got = out["proposals"][i][out["proposal_valid"][i]]
    assert len(got) == len(want) and len(want) > 500
    j, iou = _match(got, want)
    assert np.all(iou > 0.999)
    assert len(set(j)) == len(j)
    np.testing.assert_allclose(got, want[j], atol=1e-3)


def test_detections_and_masks(mask_rcnn_run):
  theirs, _, out = mask_rcnn_run
  for i, det in enumerate(theirs["detections"]):
    want_boxes = det["boxes"].numpy()
    valid = out["valid"][i]
    got_boxes = out["boxes"][i][valid]
    assert len(got_boxes) == len(want_boxes) and len(want_boxes) >= 20
    assert len(np.unique(det["labels"].numpy())) >= 3, "the test needs detections of several classes"
    j, iou = _match(got_boxes, want_boxes)
    assert np.all(iou > 0.999) and len(set(j)) == len(j)
    np.testing.assert_allclose(got_boxes, want_boxes[j], atol=1e-3)
    np.testing.assert_array_equal(out["classes"][i][valid], det["labels"].numpy()[j])
    np.testing.assert_allclose(out["scores"][i][valid], det["scores"].numpy()[j], atol=1e-4)
    # Masks: the 28x28 probabilities, then pasted into the (resized) image by each side's own paster.
    want_masks = det["masks"][:, 0].numpy()[j]
    got_masks = out["masks"][i][valid]
    np.testing.assert_allclose(got_masks, want_masks, atol=1e-3)  # logits reach |75|: float32 summation order shows
    h, w = theirs["sizes"][i]
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    want_pasted = paste_masks_in_image(torch.tensor(want_masks)[:, None], torch.tensor(want_boxes[j]), (h, w))
    want_pasted = want_pasted[:, 0].numpy() > 0.5
    got_pasted = np.asarray(mask_ops.paste_masks(jnp.asarray(got_masks), jnp.asarray(got_boxes), (h, w), 0.5,
                                                 "torchvision"))
    agree = (got_pasted == want_pasted).mean()
    assert agree >= 0.999, f"pasted masks agree on {agree:.5f} of pixels"


@pytest.fixture(scope="module")
def keypoint_rcnn_run():
  torch.manual_seed(0)
  model = torchvision.models.detection.keypointrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, min_size=320, max_size=512).eval()
  rng = np.random.default_rng(1)
  images = [rng.random((3, 480, 640), np.float32), rng.random((3, 600, 400), np.float32)]
  _spread_weights(model, 2, images)
  with torch.no_grad():  # one foreground class: lift it so that many boxes pass the 0.05 score threshold
    model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 4.0]))
  from conftest import load_config

  return _run_both(model, load_config("torchvision_keypointrcnn_r50_fpn"), images)


def test_keypoints(keypoint_rcnn_run):
  theirs, _, out = keypoint_rcnn_run
  for i, det in enumerate(theirs["detections"]):
    valid = out["valid"][i]
    got_boxes = out["boxes"][i][valid]
    want_boxes = det["boxes"].numpy()
    assert len(got_boxes) == len(want_boxes) and len(want_boxes) >= 10
    j, iou = _match(got_boxes, want_boxes)
    assert np.all(iou > 0.999) and len(set(j)) == len(j)
    np.testing.assert_allclose(got_boxes, want_boxes[j], atol=1e-3)
    got = out["keypoints"][i][valid]  # (n, 17, 3): x, y, heatmap score
    want_xy = det["keypoints"].numpy()[j][..., :2]
    want_score = det["keypoints_scores"].numpy()[j]
    np.testing.assert_allclose(got[..., :2], want_xy, atol=1e-2)
    np.testing.assert_allclose(got[..., 2], want_score, rtol=1e-4, atol=1e-3)


def test_predictor_end_to_end_matches_torchvision():
  """The whole path a user takes: RGB images of their own sizes -> Predictor (resize, normalize, pad, infer, rescale,
  paste) against torchvision's model called on the same images, in original-image pixels."""
  from conftest import load_config

  from mrcnn_jax.predictor import Predictor

  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, min_size=320, max_size=512).eval()
  rng = np.random.default_rng(2)
  images = [rng.random((480, 640, 3), np.float32), rng.random((600, 400, 3), np.float32)]
  _spread_weights(model, 3, [im.transpose(2, 0, 1) for im in images])
  with torch.no_grad():
    want = model([torch.tensor(im).permute(2, 0, 1) for im in images])
  config = load_config("torchvision_maskrcnn_r50_fpn")
  config.input.min_size_test, config.input.max_size_test = 320, 512
  # torchvision pads the batch to its largest image (rounded up to 32): the same canvas gives the same anchors.
  config.input.canvas_hw = (480, 448)
  variables = tv_convert.convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()})
  got = Predictor(config, variables, batch_size=2)(images)
  for g, w, image in zip(got, want, images):
    assert len(g["boxes"]) == len(w["boxes"]) >= 20
    j, iou = _match(g["boxes"], w["boxes"].numpy())
    assert np.all(iou > 0.999) and len(set(j)) == len(j)
    np.testing.assert_allclose(g["boxes"], w["boxes"].numpy()[j], atol=1e-3)
    np.testing.assert_array_equal(g["labels"], w["labels"].numpy()[j])
    np.testing.assert_allclose(g["scores"], w["scores"].numpy()[j], atol=1e-4)
    assert g["masks"].shape == (len(j),) + image.shape[:2] and g["masks"].dtype == bool
    agree = (g["masks"] == (w["masks"][:, 0].numpy()[j] > 0.5)).mean()
    assert agree >= 0.999, f"pasted masks agree on {agree:.5f} of pixels"
