"""Training losses against torchvision's Mask R-CNN in train mode.

Sampling keeps every candidate on both sides (batch sizes per image above the number of candidates), so the losses
are deterministic and must agree: loss_rpn_cls / loss_rpn_loc / loss_cls / loss_box_reg to 1e-4. loss_mask reads
its targets from 112x112 crops of each instance's box (docs/design.md, "Mask targets") where torchvision pools the
full-image masks, so it agrees to resampling error only; given torchvision's own targets it agrees to 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.convert import torchvision as tv_convert
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops import masks as mask_ops

torch = pytest.importorskip("torch", reason="torchvision is the parity oracle; install the `parity` extra")
torchvision = pytest.importorskip("torchvision", reason="torchvision is the parity oracle")

KEEP_ALL = 10**7
# Two image sizes with the same frame (both round up to 320x448): see the first test.
FRAME_SIZES = [(320, 426), (320, 448)]


def _ellipses(rng, hw, n):
  yy, xx = np.mgrid[: hw[0], : hw[1]]
  masks, boxes = [], []
  for _ in range(n):
    cy, cx = rng.uniform(40, hw[0] - 40), rng.uniform(40, hw[1] - 40)
    ry, rx = rng.uniform(15, 60), rng.uniform(15, 60)
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    ys, xs = np.nonzero(m)
    masks.append(m.astype(np.uint8))
    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
  return np.stack(masks), np.array(boxes, np.float32)


def test_losses_match_torchvision_train_mode(load_config):
  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, min_size=320, max_size=512, rpn_batch_size_per_image=KEEP_ALL,
      box_batch_size_per_image=KEEP_ALL)
  model.train()
  for mod in model.modules():  # frozen BatchNorm (running statistics), as mrcnn_jax's FrozenBN
    if isinstance(mod, torch.nn.BatchNorm2d):
      mod.eval()
  rng = np.random.default_rng(0)
  # Images already at the transform's size (scale 1): torchvision's resize of images and targets is the identity.
  # Both round up to the same 320x448 frame, the padded batch torchvision trains on: there every anchor of the batch
  # is inside each image's frame, as in mrcnn_jax (which ignores anchors outside an image's frame; torchvision
  # trains on them as negatives when a batch mate is larger).
  sizes = FRAME_SIZES
  images, targets, gt = [], [], []
  for i, hw in enumerate(sizes):
    masks, boxes = _ellipses(rng, hw, 3 + i)
    labels = rng.integers(1, 91, len(boxes))
    images.append(torch.tensor(rng.random((3,) + hw, np.float32)))
    targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "masks": torch.tensor(masks)})
    gt.append((boxes, labels, masks))
  with torch.no_grad():
    image_list, _ = model.transform(images, [dict(t) for t in targets])
    want = model(images, targets)
  want = {k: float(v) for k, v in want.items()}

  config = load_config("mask_rcnn_R50_FPN_torchvision")
  canvas = image_list.tensors.shape[-2:]
  a = config.model.anchors
  num_anchors = sum(len(x) for x in anchor_ops.generate_anchors(
      tuple(canvas), (4, 8, 16, 32, 64), a.sizes, a.aspect_ratios, convention=a.convention))
  config.model.rpn.batch_size_per_image = int(num_anchors)
  config.model.roi_heads.batch_size_per_image = config.model.rpn.post_nms_topk_train + 8
  config.model.roi_heads.positive_fraction = 0.05  # the mask head's 100 slots hold every foreground RoI
  g = 8
  batch = {
      "image": jnp.asarray(image_list.tensors.permute(0, 2, 3, 1).numpy()),
      "image_info": jnp.asarray(np.array([[h, w, 1, 1, h, w] for h, w in sizes], np.float32)),
      "gt_boxes": np.zeros((2, g, 4), np.float32), "gt_classes": np.zeros((2, g), np.int32),
      "gt_valid": np.zeros((2, g), bool), "gt_is_crowd": np.zeros((2, g), bool),
      "gt_masks": np.zeros((2, g, 112, 112), np.uint8),
  }
  for i, (boxes, labels, masks) in enumerate(gt):
    n = len(boxes)
    batch["gt_boxes"][i, :n], batch["gt_classes"][i, :n], batch["gt_valid"][i, :n] = boxes, labels, True
    batch["gt_masks"][i, :n] = mask_ops.crop_masks_to_boxes(masks, boxes)
  variables = tv_convert.convert_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()})
  net = mask_rcnn.MaskRCNN(config.model, train=True)
  got = jax.jit(lambda v, b: net.apply(v, b, jax.random.key(0), method=mask_rcnn.MaskRCNN.losses))(variables, batch)
  got = {k: float(v) for k, v in got.items()}

  names = {"loss_rpn_cls": "loss_objectness", "loss_rpn_loc": "loss_rpn_box_reg", "loss_cls": "loss_classifier",
           "loss_box_reg": "loss_box_reg"}
  for ours, theirs in names.items():
    assert got[ours] == pytest.approx(want[theirs], rel=1e-4, abs=1e-6), (ours, got[ours], want[theirs])
  assert got["loss_mask"] == pytest.approx(want["loss_mask"], rel=2e-2)
  assert got["total_loss"] == pytest.approx(sum(got[k] for k in got if k != "total_loss"), rel=1e-6)


def test_keypoint_losses_match_torchvision_train_mode(load_config):
  torch.manual_seed(0)
  model = torchvision.models.detection.keypointrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, min_size=320, max_size=512, rpn_batch_size_per_image=KEEP_ALL,
      box_batch_size_per_image=KEEP_ALL)
  model.train()
  for mod in model.modules():
    if isinstance(mod, torch.nn.BatchNorm2d):
      mod.eval()
  rng = np.random.default_rng(1)
  sizes = FRAME_SIZES
  images, targets, gt = [], [], []
  for i, hw in enumerate(sizes):
    _, boxes = _ellipses(rng, hw, 2 + i)
    n = len(boxes)
    # 17 keypoints per person, most inside the box, some outside, some unlabeled.
    kx = rng.uniform(boxes[:, None, 0] - 5, boxes[:, None, 2] + 5, (n, 17))
    ky = rng.uniform(boxes[:, None, 1] - 5, boxes[:, None, 3] + 5, (n, 17))
    vis = rng.choice([0, 1, 2], (n, 17), p=[0.2, 0.3, 0.5]).astype(np.float32)
    kps = np.stack([kx, ky, vis], -1).astype(np.float32)
    images.append(torch.tensor(rng.random((3,) + hw, np.float32)))
    targets.append({"boxes": torch.tensor(boxes), "labels": torch.ones(n, dtype=torch.int64),
                    "keypoints": torch.tensor(kps)})
    gt.append((boxes, kps))
  with torch.no_grad():
    image_list, _ = model.transform(images, [dict(t) for t in targets])
    want = {k: float(v) for k, v in model(images, targets).items()}

  config = load_config("keypoint_rcnn_R50_FPN_torchvision")
  canvas = image_list.tensors.shape[-2:]
  a = config.model.anchors
  config.model.rpn.batch_size_per_image = int(sum(len(x) for x in anchor_ops.generate_anchors(
      tuple(canvas), (4, 8, 16, 32, 64), a.sizes, a.aspect_ratios, convention=a.convention)))
  config.model.roi_heads.batch_size_per_image = config.model.rpn.post_nms_topk_train + 8
  config.model.roi_heads.positive_fraction = 0.05
  g = 8
  batch = {
      "image": jnp.asarray(image_list.tensors.permute(0, 2, 3, 1).numpy()),
      "image_info": jnp.asarray(np.array([[h, w, 1, 1, h, w] for h, w in sizes], np.float32)),
      "gt_boxes": np.zeros((2, g, 4), np.float32), "gt_classes": np.zeros((2, g), np.int32),
      "gt_valid": np.zeros((2, g), bool), "gt_is_crowd": np.zeros((2, g), bool),
      "gt_keypoints": np.zeros((2, g, 17, 3), np.float32),
  }
  for i, (boxes, kps) in enumerate(gt):
    n = len(boxes)
    batch["gt_boxes"][i, :n], batch["gt_classes"][i, :n], batch["gt_valid"][i, :n] = boxes, 1, True
    batch["gt_keypoints"][i, :n] = kps
  variables = tv_convert.convert_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()})
  net = mask_rcnn.MaskRCNN(config.model, train=True)
  got = jax.jit(lambda v, b: net.apply(v, b, jax.random.key(0), method=mask_rcnn.MaskRCNN.losses))(variables, batch)
  got = {k: float(v) for k, v in got.items()}
  names = {"loss_rpn_cls": "loss_objectness", "loss_rpn_loc": "loss_rpn_box_reg", "loss_cls": "loss_classifier",
           "loss_box_reg": "loss_box_reg", "loss_keypoint": "loss_keypoint"}
  for ours, theirs in names.items():
    assert got[ours] == pytest.approx(want[theirs], rel=1e-4, abs=1e-6), (ours, got[ours], want[theirs])
