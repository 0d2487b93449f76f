"""Parity with Detectron2's rules, as users run them: the shipped configs/mask_rcnn_R50_FPN_1x.py, unchanged, through
the `Predictor`, against a transcription of Detectron2's GeneralizedRCNN inference for mask_rcnn_R_50_FPN_1x.

Detectron2 cannot be installed here, so the oracle is written in this file, in torch, from Detectron2's source
(detectron2/modeling: anchor_generator.DefaultAnchorGenerator, proposal_generator/proposal_utils.
find_top_rpn_proposals, poolers.ROIPooler with ROIAlignV2, roi_heads/fast_rcnn.fast_rcnn_inference,
mask_head.mask_rcnn_inference, postprocessing.detector_postprocess; data/transforms ResizeShortestEdge; layers/
mask_ops.paste_masks_in_image, transcribed in tests/detectron2_oracle.py), on the network body of torchvision's Mask
R-CNN, which is Detectron2's R50-FPN layer for layer once each bottleneck's stride is moved into its first 1x1
convolution (MSRA's ResNet, `stride_in_1x1`). RoIAlign is torchvision's `roi_align(aligned=True, sampling_ratio=0)`,
the op Detectron2's ROIAlignV2 calls, with its adaptive sampling unbounded.

Each image runs alone in the oracle (Detectron2 pads it to its size rounded up to 32); mrcnn_jax pads it to one of
the config's canvases (800x1088, 1088x800), alone and beside an image of the other orientation.
"""

import numpy as np
import pytest
from PIL import Image

from mrcnn_jax.convert import torchvision as tv_convert
from mrcnn_jax.data import transforms
from mrcnn_jax.modeling import mask_rcnn
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.predictor import Predictor

torch = pytest.importorskip("torch", reason="torch runs the transcribed Detectron2 oracle; install the `parity` extra")
torchvision = pytest.importorskip("torchvision", reason="torchvision's network body and ops serve the oracle")

from torch_weights import spread_weights  # noqa: E402  (tests/torch_weights.py)

SIZES = {"640x480": (480, 640), "480x640": (640, 480)}
PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)


def _images(seed):
  """Smooth random uint8 RGB pictures (see test_parity_torchvision._images)."""
  rng = np.random.default_rng(seed)
  images = {}
  for name, (h, w) in SIZES.items():
    coarse = (rng.random((h // 24, w // 24, 3)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    images[name] = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
  return images


# --- the oracle: Detectron2's inference, transcribed ---------------------------------------------------------------


def _preprocess(image):
  """ResizeShortestEdge(800, 1333) on uint8 with PIL's bilinear filter, then BGR minus the mean (std 1), padded with
  zeros to a multiple of 32 (ImageList.from_tensors). Returns the (1, 3, H32, W32) tensor and the resized size."""
  h, w = image.shape[:2]
  scale = 800.0 / min(h, w)
  new_h, new_w = (800.0, scale * w) if h < w else (scale * h, 800.0)
  if max(new_h, new_w) > 1333:
    s = 1333.0 / max(new_h, new_w)
    new_h, new_w = new_h * s, new_w * s
  new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR), np.float32)
  x = torch.from_numpy(resized[..., ::-1].copy()).permute(2, 0, 1) - torch.tensor(PIXEL_MEAN_BGR)[:, None, None]
  ph, pw = -(-new_h // 32) * 32, -(-new_w // 32) * 32
  return torch.nn.functional.pad(x, (0, pw - new_w, 0, ph - new_h))[None], (new_h, new_w)


def _d2_anchors(grid_hw, stride, size):
  """DefaultAnchorGenerator, offset 0.0, aspect ratios (0.5, 1, 2): (H * W * 3, 4), location-major."""
  cells = []
  for ratio in (0.5, 1.0, 2.0):
    w = (size * size / ratio) ** 0.5
    h = ratio * w
    cells.append([-w / 2, -h / 2, w / 2, h / 2])
  cells = torch.tensor(cells, dtype=torch.float32)
  sx = torch.arange(0, grid_hw[1] * stride, step=stride, dtype=torch.float32)
  sy = torch.arange(0, grid_hw[0] * stride, step=stride, dtype=torch.float32)
  yy, xx = torch.meshgrid(sy, sx, indexing="ij")
  shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], dim=1)
  return (shifts.view(-1, 1, 4) + cells.view(1, -1, 4)).reshape(-1, 4)


def _apply_deltas(deltas, boxes, weights):
  """Box2BoxTransform.apply_deltas, scale clamp log(1000 / 16)."""
  wx, wy, ww, wh = weights
  widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  cx, cy = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
  dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
  dw = torch.clamp(deltas[:, 2::4] / ww, max=np.log(1000.0 / 16))
  dh = torch.clamp(deltas[:, 3::4] / wh, max=np.log(1000.0 / 16))
  pcx, pcy = dx * widths[:, None] + cx[:, None], dy * heights[:, None] + cy[:, None]
  pw, ph = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
  out = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=-1)
  return out.reshape(deltas.shape)


def _clip(boxes, hw):
  return torch.stack([boxes[:, 0].clamp(0, hw[1]), boxes[:, 1].clamp(0, hw[0]), boxes[:, 2].clamp(0, hw[1]),
                      boxes[:, 3].clamp(0, hw[0])], dim=1)


def _pool(feats, boxes, size):
  """ROIPooler(ROIAlignV2, sampling_ratio 0, canonical 224 at level 4) over P2..P5."""
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  levels = torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8)).clamp(2, 5).to(torch.int64)
  out = torch.zeros((len(boxes), feats[0].shape[1], size, size))
  for i, level in enumerate(range(2, 6)):
    idx = torch.nonzero(levels == level).flatten()
    if len(idx):
      rois = torch.cat([torch.zeros(len(idx), 1), boxes[idx]], dim=1)
      out[idx] = torchvision.ops.roi_align(feats[i], rois, (size, size), 1.0 / 2**level, 0, aligned=True)
  return out


@torch.no_grad()
def _detectron2_alone(model, image):
  """mask_rcnn_R_50_FPN_1x inference on one uint8 RGB image -> boxes, scores, labels in original pixels (the
  labels as mrcnn_jax's, 1..80), masks (n, 28, 28) probabilities; and the 28x28 paste inputs."""
  x, (h, w) = _preprocess(image)
  feats = list(model.backbone(x).values())  # P2..P6
  objectness, deltas = model.rpn.head(feats)
  cand_boxes, cand_scores, cand_levels = [], [], []
  for level, (logits, d, f) in enumerate(zip(objectness, deltas, feats)):
    grid = f.shape[2:]
    anchors = _d2_anchors(grid, 2 ** (level + 2), 32 * 2**level)
    logits = logits[0].permute(1, 2, 0).reshape(-1)
    d = d[0].view(3, 4, *grid).permute(2, 3, 0, 1).reshape(-1, 4)
    k = min(1000, len(logits))
    top, idx = logits.topk(k)
    cand_boxes.append(_apply_deltas(d[idx], anchors[idx], (1.0, 1.0, 1.0, 1.0)))
    cand_scores.append(top)
    cand_levels.append(torch.full((k,), level))
  boxes, scores, levels = _clip(torch.cat(cand_boxes), (h, w)), torch.cat(cand_scores), torch.cat(cand_levels)
  keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
  boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
  proposals = boxes[torchvision.ops.batched_nms(boxes, scores, levels, 0.7)[:1000]]

  rh = model.roi_heads
  logits, box_deltas = rh.box_predictor(rh.box_head(_pool(feats[:4], proposals, 7)))
  probs = torch.softmax(logits, dim=1)[:, 1:]  # mrcnn_jax's layout: background first
  per_class = _apply_deltas(box_deltas[:, 4:], proposals, (10.0, 10.0, 5.0, 5.0)).reshape(-1, 80, 4)
  per_class = _clip(per_class.reshape(-1, 4), (h, w)).reshape(-1, 80, 4)
  mask = probs > 0.05
  rows, classes = torch.nonzero(mask, as_tuple=True)
  det_boxes, det_scores = per_class[rows, classes], probs[rows, classes]
  keep = torchvision.ops.batched_nms(det_boxes, det_scores, classes, 0.5)[:100]
  det_boxes, det_scores, labels = det_boxes[keep], det_scores[keep], classes[keep] + 1
  mask_logits = rh.mask_predictor(rh.mask_head(_pool(feats[:4], det_boxes, 14)))
  masks = torch.sigmoid(mask_logits[torch.arange(len(labels)), labels])

  # detector_postprocess: to original pixels, clipped, empty boxes dropped.
  oh, ow = image.shape[:2]
  scaled = _clip(det_boxes * torch.tensor([ow / w, oh / h, ow / w, oh / h]), (oh, ow))
  nonempty = ((scaled[:, 2] - scaled[:, 0]) > 0) & ((scaled[:, 3] - scaled[:, 1]) > 0)
  return {"boxes": scaled[nonempty].numpy(), "scores": det_scores[nonempty].numpy(),
          "labels": labels[nonempty].numpy(), "masks28": masks[nonempty].numpy()}


def _msra_strides(model):
  """torchvision's bottleneck strides in the 3x3 conv; MSRA's (Detectron2's R-50) in the first 1x1."""
  for layer in (model.backbone.body.layer2, model.backbone.body.layer3, model.backbone.body.layer4):
    block = layer[0]
    block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


@pytest.fixture(scope="module")
def runs():
  from conftest import load_config

  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                             num_classes=81).eval()
  _msra_strides(model)
  images = _images(3)
  spread_weights(model, 4, _preprocess(images["640x480"])[0])
  theirs = {name: _detectron2_alone(model, image) for name, image in images.items()}
  config = load_config("mask_rcnn_R50_FPN_1x")
  variables = tv_convert.convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()})
  infer = mask_rcnn.build_infer(config)
  predictor = Predictor(config, variables, infer_fn=infer, batch_size=2)  # batch 2 throughout: one compile a canvas
  ours = {name: predictor([image])[0] for name, image in images.items()}
  ours["mixed"] = predictor(list(images.values()))
  canvases = {name: transforms.eval_canvas(*image.shape[:2], config.input) for name, image in images.items()}
  return theirs, ours, canvases, images


def test_canvases(runs):
  _, _, canvases, _ = runs
  assert canvases == {"640x480": (800, 1088), "480x640": (1088, 800)}


@pytest.mark.parametrize("name", list(SIZES))
def test_detections_match_the_transcribed_detectron2(runs, name):
  from detectron2_oracle import detectron2_paste_oracle

  theirs, ours, _, images = runs
  got, want = ours[name], theirs[name]
  assert len(got["boxes"]) == len(want["boxes"]) >= 20
  assert len(np.unique(want["labels"])) >= 3
  iou = np.asarray(box_ops.box_iou(got["boxes"], want["boxes"]))
  j = iou.argmax(1)
  assert np.all(iou.max(1) > 0.999) and len(set(j)) == len(j)
  np.testing.assert_allclose(got["boxes"], want["boxes"][j], atol=2e-3)
  np.testing.assert_array_equal(got["labels"], want["labels"][j])
  np.testing.assert_allclose(got["scores"], want["scores"][j], atol=1e-4)
  pasted = detectron2_paste_oracle(want["masks28"][j], want["boxes"][j], images[name].shape[:2]) >= 0.5
  agree = (got["masks"] == pasted).mean()
  assert agree >= 0.999, f"pasted masks agree on {agree:.5f} of pixels"


def test_landscape_and_portrait_together(runs):
  _, ours, _, _ = runs
  for got, name in zip(ours["mixed"], SIZES):
    for key in ("boxes", "scores", "labels", "masks"):
      np.testing.assert_array_equal(got[key], ours[name][key])


def test_adaptive_bound_is_derived_from_the_largest_canvas(runs):
  from conftest import load_config

  config = load_config("mask_rcnn_R50_FPN_1x")
  # 1344 px / 32 (P5) / 7 bins -> 6 samples per bin and axis; / 14 -> 3.
  assert mask_rcnn.sampling_bound(config.model, 7, mask_rcnn.max_canvas_side(config)) == 6
  assert mask_rcnn.sampling_bound(config.model, 14, mask_rcnn.max_canvas_side(config)) == 3
  config.model.pooler.max_sampling_ratio = 2  # an explicit override wins
  assert mask_rcnn.sampling_bound(config.model, 7, 1344) == 2
