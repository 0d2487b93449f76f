"""Parity with torchvision as users run it: its Mask R-CNN and Keypoint R-CNN (random weights, converted with
`convert_state_dict`) against mrcnn_jax's `Predictor` with the shipped configs unchanged, on ordinary image sizes.

The images are COCO's common sizes (W x H): 640x480 and 500x375 (landscape, resized to 800x1066 and padded by
torchvision to 800x1088), 480x640 (portrait, 1066x800 -> 1088x800) and 1333x800 (800x1333 -> 800x1344), each given to
both models alone, and a landscape and a portrait image given together. torchvision, at its defaults (min_size 800,
max_size 1333), runs each image alone: that is the oracle. (Given both at once, torchvision pads them to one
1088x1088 tensor and its own detections change, because its anchors and top-k then see the padding; mrcnn_jax's do
not, by design: ops/frames.py.) mrcnn_jax pads each image to the smallest canvas of the config that holds it
(800x1088, 1088x800 or 800x1344) and computes it inside its own frame, so its results are torchvision's whatever
the canvas and the batch.

Compared: FPN features inside the frame, RPN proposals, and the final detections in original-image pixels (boxes,
labels, scores, pasted masks; keypoints with their scores). Detections are matched by IoU, not by index, since
near-ties may swap their order.
"""

import jax
import numpy as np
import pytest
from PIL import Image

from mrcnn_jax.convert import torchvision as tv_convert
from mrcnn_jax.data import transforms
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import frames as frame_ops
from mrcnn_jax.predictor import Predictor

torch = pytest.importorskip("torch", reason="torchvision is the parity oracle; install the `parity` extra")
torchvision = pytest.importorskip("torchvision", reason="torchvision is the parity oracle")

from torch_weights import spread_weights  # noqa: E402  (tests/torch_weights.py)

# Original (H, W) of the test images, by their COCO-style W x H name.
SIZES = {"640x480": (480, 640), "480x640": (640, 480), "500x375": (375, 500), "1333x800": (800, 1333)}
# The default run covers the 800x1088 and 1088x800 canvases (three sizes and the mixed batch); what needs a third
# R50 program compiled for a model (the 800x1344 canvas, the keypoint model's portrait canvas, the features program
# of a second canvas) is marked slow: `pytest -m slow` runs it (README, "Tests").
SLOW = {"features": {"480x640", "1333x800"}, "masks": {"1333x800"}, "keypoints": {"480x640", "1333x800", "mixed"}}


def _params(kind, names=tuple(SIZES)):
  return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW[kind] else n for n in names]




def _preprocessed(model, image):
  """torchvision's input tensor for one image (normalized, resized, padded)."""
  with torch.no_grad():
    return model.transform([torch.tensor(image).permute(2, 0, 1)])[0].tensors


def _images(seed):
  """Smooth random pictures (a coarse random grid, bicubic-enlarged, plus a little noise), float in [0, 1]: unlike
  white noise, their statistics survive torchvision's resize, so that one set of BatchNorm statistics suits every
  size and the classifier's scores stay spread (no saturated ties at 1.0)."""
  rng = np.random.default_rng(seed)
  images = {}
  for name, (h, w) in SIZES.items():
    coarse = (rng.random((h // 24, w // 24, 3)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255
    images[name] = np.clip(image + rng.normal(0, 0.05, image.shape).astype(np.float32), 0, 1)
  return images


def _torchvision_alone(model, image):
  """torchvision on one image, its forward taken apart: features and proposals on its own padded tensor, then its
  detections (roi_heads and the transform's postprocess, as GeneralizedRCNN.forward runs them)."""
  with torch.no_grad():
    x = torch.tensor(image).permute(2, 0, 1)
    image_list, _ = model.transform([x])
    feats = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, feats)
    detections, _ = model.roi_heads(feats, proposals, image_list.image_sizes)
    detections = model.transform.postprocess(detections, image_list.image_sizes, [image.shape[:2]])[0]
  return {"feats": [f[0].permute(1, 2, 0).numpy() for f in feats.values()], "proposals": proposals[0].numpy(),
          "detections": {k: v.numpy() for k, v in detections.items()}, "padded_hw": tuple(image_list.tensors.shape[2:])}


class _Ours:
  """mrcnn_jax on each image alone (proposals, the Predictor's results, the features), and the Predictor on a
  landscape and a portrait image given together, each computed when a test first asks for it: a canvas's programs
  compile only if a selected test needs them. Every program runs at batch 2 (an image and a blank slot, or the
  images of one canvas), so that each canvas compiles once."""

  def __init__(self, config, variables, images):
    self.config, self.variables, self.images = config, variables, images
    model = mask_rcnn.build_model(config)
    self.predictor = Predictor(config, variables, batch_size=2)
    self.run_features = jax.jit(lambda v, x, f: model.apply(v, x, f, method=mask_rcnn.MaskRCNN.features))
    self._alone, self._proposals, self._feats, self._mixed = {}, {}, {}, None

  def _batch(self, name):
    canvas, info = transforms.preprocess(self.images[name], self.config.input)
    blank = np.array([*canvas.shape[:2], 1, 1, *canvas.shape[:2]], np.float32)
    batch, batch_info = np.stack([canvas, np.zeros_like(canvas)]), np.stack([info, blank])
    return batch, batch_info, frame_ops.image_frames(batch_info[:, :2], self.config.model.size_divisibility)

  def __getitem__(self, name):
    """The Predictor's detections of the image alone."""
    if name not in self._alone:
      self._alone[name] = self.predictor([self.images[name]])[0]
    return self._alone[name]

  def proposals(self, name):
    """The RPN's proposals of the image alone: the Predictor's program, called directly."""
    if name not in self._proposals:
      batch, batch_info, _ = self._batch(name)
      raw = jax.device_get(self.predictor.program(self.predictor.variables, batch, batch_info))
      self._proposals[name] = raw["proposals"][0][raw["proposal_valid"][0]]
    return self._proposals[name]

  def feats(self, name):
    if name not in self._feats:
      batch, _, frames = self._batch(name)
      feats = jax.device_get(self.run_features(self.variables, batch, frames))
      self._feats[name] = [feats[level][0] for level in sorted(feats)]
    return self._feats[name]

  def mixed(self):
    if self._mixed is None:
      self._mixed = self.predictor([self.images["640x480"], self.images["480x640"]])
    return self._mixed


class _Theirs:
  """torchvision on each image alone, computed when first asked for."""

  def __init__(self, model, images):
    self.model, self.images, self._alone = model, images, {}

  def __getitem__(self, name):
    if name not in self._alone:
      self._alone[name] = _torchvision_alone(self.model, self.images[name])
    return self._alone[name]

  def padded_hw(self, name):
    with torch.no_grad():
      image_list, _ = self.model.transform([torch.tensor(self.images[name]).permute(2, 0, 1)])
    return tuple(image_list.tensors.shape[2:])

  def batched(self, names):
    with torch.no_grad():
      together = self.model([torch.tensor(self.images[n]).permute(2, 0, 1) for n in names])
    return [{k: v.numpy() for k, v in d.items()} for d in together]


def _convert(model):
  return tv_convert.convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module")
def mask_rcnn_runs():
  from conftest import load_config

  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
  images = _images(0)
  spread_weights(model, 1, _preprocessed(model, images["640x480"]))
  return _Theirs(model, images), _Ours(load_config("mask_rcnn_R50_FPN_torchvision"), _convert(model), images)


def _match(ours_boxes, theirs_boxes):
  """Index into `theirs` of each of ours by best IoU, and that IoU."""
  iou = np.asarray(box_ops.box_iou(np.asarray(ours_boxes), np.asarray(theirs_boxes)))
  return iou.argmax(1), iou.max(1)


def _assert_same_detections(got, want, *, masks=True, min_count=20):
  assert len(got["boxes"]) == len(want["boxes"]) >= min_count
  j, iou = _match(got["boxes"], want["boxes"])
  # The coordinates' tolerance is the test; the IoU only checks the match (a sliver clipped at the image's edge,
  # 0.15 px wide, has IoU 0.9992 at a 1e-4 px difference).
  assert np.all(iou > 0.99) and len(set(j)) == len(j)
  np.testing.assert_allclose(got["boxes"], want["boxes"][j], atol=2e-3)
  np.testing.assert_array_equal(got["labels"], want["labels"][j])
  np.testing.assert_allclose(got["scores"], want["scores"][j], atol=1e-4)
  if masks:
    assert got["masks"].dtype == bool and got["masks"].shape[1:] == want["masks"].shape[2:]
    agree = (got["masks"] == (want["masks"][j, 0] > 0.5)).mean()
    assert agree >= 0.999, f"pasted masks agree on {agree:.5f} of pixels"
  return j


@pytest.mark.parametrize("name", list(SIZES))
def test_canvas_and_frame_of_each_size(mask_rcnn_runs, name):
  """The canvas is the smallest shipped one that holds the image, and the frame is torchvision's padded size."""
  theirs, ours = mask_rcnn_runs
  want_canvas = {"640x480": (800, 1088), "500x375": (800, 1088), "480x640": (1088, 800), "1333x800": (800, 1344)}
  batch, _, frames = ours._batch(name)
  assert batch.shape[1:3] == want_canvas[name]
  assert tuple(int(v) for v in np.asarray(frames)[0]) == theirs.padded_hw(name)


@pytest.mark.parametrize("name", _params("features"))
def test_fpn_features_inside_the_frame(mask_rcnn_runs, name):
  theirs, ours = mask_rcnn_runs
  for level, (want, got) in enumerate(zip(theirs[name]["feats"], ours.feats(name)), start=2):
    h, w = want.shape[:2]
    rel = np.abs(got[:h, :w] - want).max() / np.abs(want).max()
    assert rel < 1e-4, f"{name} P{level}: max relative difference {rel}"


@pytest.mark.parametrize("name", _params("masks"))
def test_rpn_proposals(mask_rcnn_runs, name):
  theirs, ours = mask_rcnn_runs
  want, got = theirs[name]["proposals"], ours.proposals(name)
  assert len(got) == len(want) == 1000
  j, iou = _match(got, want)
  assert np.all(iou > 0.999) and len(set(j)) == len(j)
  np.testing.assert_allclose(got, want[j], atol=2e-3)


@pytest.mark.parametrize("name", _params("masks"))
def test_detections_and_masks(mask_rcnn_runs, name):
  theirs, ours = mask_rcnn_runs
  want = theirs[name]["detections"]
  _assert_same_detections(ours[name], want)
  assert len(np.unique(want["labels"])) >= 3, "the test needs detections of several classes"


def test_landscape_and_portrait_together_give_each_its_own_detections(mask_rcnn_runs):
  """Given together, each image gets exactly the detections it gets alone, which are torchvision's on it alone.
  torchvision's own batched call differs from its single-image calls (it pads both to 1088x1088)."""
  theirs, ours = mask_rcnn_runs
  for got, name in zip(ours.mixed(), ("640x480", "480x640")):
    alone = ours[name]
    for key in ("boxes", "scores", "labels", "masks"):
      np.testing.assert_array_equal(got[key], alone[key])
    _assert_same_detections(got, theirs[name]["detections"])
  differs = [len(b["boxes"]) != len(theirs[n]["detections"]["boxes"]) or
             not np.allclose(b["boxes"], theirs[n]["detections"]["boxes"], atol=1e-2)
             for b, n in zip(theirs.batched(("640x480", "480x640")), ("640x480", "480x640"))]
  assert any(differs), "torchvision's batched call now matches its single-image calls: update this docstring"


@pytest.fixture(scope="module")
def keypoint_rcnn_runs():
  from conftest import load_config

  torch.manual_seed(0)
  model = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
  images = _images(1)
  spread_weights(model, 2, _preprocessed(model, images["640x480"]))
  with torch.no_grad():  # one foreground class: lift it so that many boxes pass the 0.05 score threshold
    model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 4.0]))
  return _Theirs(model, images), _Ours(load_config("keypoint_rcnn_R50_FPN_torchvision"), _convert(model), images)


@pytest.mark.parametrize("name", _params("keypoints", (*SIZES, "mixed")))
def test_keypoints(keypoint_rcnn_runs, name):
  theirs, ours = keypoint_rcnn_runs
  pairs = ([(ours[name], theirs[name]["detections"])] if name != "mixed" else
           [(got, theirs[n]["detections"]) for got, n in zip(ours.mixed(), ("640x480", "480x640"))])
  for got, want in pairs:
    j = _assert_same_detections(got, want, masks=False, min_count=10)
    np.testing.assert_allclose(got["keypoints"][..., :2], want["keypoints"][j][..., :2], atol=1e-2)
    np.testing.assert_allclose(got["keypoints"][..., 2], want["keypoints_scores"][j], rtol=1e-4, atol=1e-3)
