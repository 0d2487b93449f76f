"""Mask R-CNN (He et al., 2017) and Keypoint R-CNN: the whole model, as one Flax module.

I/O contract:
- `MaskRCNN.infer(images (B, H, W, 3) float32 normalized, image_info (B, 6) float32)` -> dict of fixed-size arrays
  (D = detections per image): boxes (B, D, 4) XYXY in input (canvas) pixels, scores (B, D), classes (B, D) int32 in
  1..K, valid (B, D) bool; masks (B, D, 28, 28) float32 probabilities of each detection's class when the mask head
  is on; keypoints (B, D, 17, 3) (x, y, score) when the keypoint head is on. One jitted program.
  image_info rows are [valid_h, valid_w, scale_h, scale_w, orig_h, orig_w] (see `data.transforms.preprocess`).
- `MaskRCNN.losses(batch, key)` (train mode) -> dict of named losses (Detectron2's names: loss_rpn_cls,
  loss_rpn_loc, loss_cls, loss_box_reg, loss_mask, loss_keypoint) and total_loss; batch is the dict of fixed-shape arrays of
  `data.pipeline.train_example` (image, image_info, gt_boxes, gt_classes, gt_valid, gt_is_crowd, gt_masks, ...).

Variables: `params` (everything trained) and `batch_stats` (frozen / running norm statistics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from mrcnn_jax.modeling import losses as loss_fns
from mrcnn_jax.modeling.box_head import BoxHead, detect
from mrcnn_jax.modeling.fpn import FPN
from mrcnn_jax.modeling.keypoint_head import KeypointHead, heatmaps_to_keypoints
from mrcnn_jax.modeling.mask_head import MaskHead, select_class_masks
from mrcnn_jax.modeling.resnet import ResNet
from mrcnn_jax.modeling.rpn import RPNHead, generate_proposals
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops import matching
from mrcnn_jax.ops import roi_align as roi_ops

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_cfg):
  try:
    return _DTYPES[model_cfg.compute_dtype]
  except KeyError:
    raise ValueError(f"model.compute_dtype {model_cfg.compute_dtype!r} is not one of {sorted(_DTYPES)}") from None


@functools.lru_cache(maxsize=16)
def _anchors(image_hw, strides, sizes, aspect_ratios, offset, convention):
  return tuple(anchor_ops.generate_anchors(image_hw, strides, sizes, aspect_ratios, offset, convention))


class MaskRCNN(nn.Module):
  """The model of a config's `model` section (see configs/mask_rcnn_R50_FPN_1x.py for the fields)."""

  config: object  # ml_collections.ConfigDict (model section); read-only here
  train: bool = False

  def setup(self):
    cfg = self.config
    dtype = compute_dtype(cfg)
    b = cfg.backbone
    self.backbone = ResNet(depth=b.depth, norm=b.norm, norm_eps=b.norm_eps, stride_in_1x1=b.stride_in_1x1,
                           freeze_at=b.freeze_at, width=b.width, train=self.train, dtype=dtype)
    self.fpn = FPN(channels=cfg.fpn.channels, dtype=dtype)
    num_anchors = len(cfg.anchors.aspect_ratios) * len(cfg.anchors.sizes[0])
    self.rpn = RPNHead(num_anchors=num_anchors, channels=cfg.fpn.channels, dtype=dtype)
    self.box_head = BoxHead(num_classes=cfg.num_classes, fc_dim=cfg.roi_heads.fc_dim, dtype=dtype)
    if cfg.mask_head.enabled:
      self.mask_head = MaskHead(num_classes=cfg.num_classes, num_convs=cfg.mask_head.num_convs,
                                conv_dim=cfg.mask_head.conv_dim, dtype=dtype)
    if cfg.keypoint_head.enabled:
      self.keypoint_head = KeypointHead(num_keypoints=cfg.keypoint_head.num_keypoints,
                                        num_convs=cfg.keypoint_head.num_convs, conv_dim=cfg.keypoint_head.conv_dim,
                                        dtype=dtype)

  # -- pieces -------------------------------------------------------------------------------------------------------

  def features(self, images):
    """images (B, H, W, 3) -> {2..6: (B, H/2**l, W/2**l, C)} FPN features."""
    return self.fpn(self.backbone(images))

  def anchors(self, image_hw):
    a = self.config.anchors
    levels = range(self.config.fpn.min_level, self.config.fpn.max_level + 1)
    return _anchors(tuple(image_hw), tuple(2**l for l in levels), tuple(tuple(s) for s in a.sizes),
                    tuple(a.aspect_ratios), float(a.offset), a.convention)

  def pool(self, feats, boxes, resolution: int):
    """Multi-level RoIAlign over P2..P5. boxes (B, R, 4) -> (B, R, res, res, C)."""
    p = self.config.pooler
    levels = [feats[l] for l in range(self.config.fpn.min_level, 6)]
    return roi_ops.multilevel_roi_align(
        levels, boxes, resolution, p.sampling_ratio, p.aligned, self.config.fpn.min_level, p.canonical_size,
        p.canonical_level, level_convention=p.level_convention, max_sampling_ratio=p.max_sampling_ratio,
        impl=p.impl)

  def proposals(self, feats, image_hw, canvas_hw):
    """RPN proposals at test time: boxes (B, P, 4), scores (B, P), valid (B, P)."""
    cfg = self.config.rpn
    levels = range(self.config.fpn.min_level, self.config.fpn.max_level + 1)
    logits, deltas = self.rpn([feats[l] for l in levels])
    anchors = self.anchors(canvas_hw)
    return generate_proposals(
        logits, deltas, anchors, image_hw,
        pre_nms_topk=cfg.pre_nms_topk_train if self.train else cfg.pre_nms_topk_test,
        post_nms_topk=cfg.post_nms_topk_train if self.train else cfg.post_nms_topk_test,
        nms_thresh=cfg.nms_thresh, min_size=cfg.min_size, score_thresh=cfg.score_thresh,
        box_weights=tuple(cfg.box_weights), sigmoid_scores=self.config.anchors.convention == "torchvision")

  # -- inference ----------------------------------------------------------------------------------------------------

  def infer(self, images, image_info):
    cfg = self.config
    image_hw = image_info[:, :2]
    feats = self.features(images)
    boxes, _, valid = self.proposals(feats, image_hw, images.shape[1:3])
    logits, deltas = self.box_head(self.pool(feats, boxes, cfg.pooler.box_resolution))
    rh = cfg.roi_heads
    out = detect(logits, deltas, boxes, valid, image_hw, score_thresh=rh.score_thresh_test,
                 nms_thresh=rh.nms_thresh_test, detections_per_image=rh.detections_per_image,
                 min_box_size=rh.min_box_size_test, box_weights=tuple(rh.box_weights))
    out["proposals"], out["proposal_valid"] = boxes, valid
    if cfg.mask_head.enabled:
      mask_logits = self.mask_head(self.pool(feats, out["boxes"], cfg.pooler.mask_resolution))
      out["masks"] = select_class_masks(mask_logits, out["classes"])
    if cfg.keypoint_head.enabled:
      heatmaps = self.keypoint_head(self.pool(feats, out["boxes"], cfg.pooler.keypoint_resolution))
      out["keypoints"] = heatmaps_to_keypoints(heatmaps, out["boxes"])
    return out


  # -- training -----------------------------------------------------------------------------------------------------

  def losses(self, batch, key):
    cfg = self.config
    convention = cfg.loss_convention
    images = batch["image"]
    b = images.shape[0]
    image_hw = batch["image_info"][:, :2]
    gt_boxes = batch["gt_boxes"]
    matchable = batch["gt_valid"] & ~batch["gt_is_crowd"]
    rpn_key, roi_key = jax.random.split(key)
    feats = self.features(images)

    # RPN: targets for every anchor of every level at once.
    r = cfg.rpn
    levels = range(cfg.fpn.min_level, cfg.fpn.max_level + 1)
    logits, deltas = self.rpn([feats[l] for l in levels])
    level_anchors = self.anchors(images.shape[1:3])
    anchors = jnp.asarray(np.concatenate(level_anchors, axis=0))
    matcher = matching.Matcher(tuple(r.iou_thresholds), tuple(r.iou_labels), True)
    targets = jax.vmap(lambda k, g, m: loss_fns.rpn_targets(
        k, anchors, g, m, matcher=matcher, batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction, box_weights=tuple(r.box_weights)))(
            jax.random.split(rpn_key, b), gt_boxes, matchable)
    beta = r.smooth_l1_beta if r.loss_type == "smooth_l1" else 0.0
    out = loss_fns.rpn_losses(jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1), *targets,
                              batch_size_per_image=r.batch_size_per_image, smooth_l1_beta=beta,
                              convention=convention)

    # Proposals (no gradient flows into them, as in both reference implementations).
    proposals, _, proposal_valid = generate_proposals(
        [jax.lax.stop_gradient(x) for x in logits], [jax.lax.stop_gradient(x) for x in deltas], level_anchors,
        image_hw, pre_nms_topk=r.pre_nms_topk_train, post_nms_topk=r.post_nms_topk_train, nms_thresh=r.nms_thresh,
        min_size=r.min_size, score_thresh=r.score_thresh, box_weights=tuple(r.box_weights),
        sigmoid_scores=cfg.anchors.convention == "torchvision")

    # Box head on sampled RoIs.
    rh = cfg.roi_heads
    samples = jax.vmap(lambda k, p, v, g, c, m: loss_fns.sample_rois(
        k, p, v, g, c, m, iou_threshold=rh.iou_threshold, batch_size_per_image=rh.batch_size_per_image,
        positive_fraction=rh.positive_fraction, append_gt=rh.proposal_append_gt,
        box_weights=tuple(rh.box_weights)))(
            jax.random.split(roi_key, b), proposals, proposal_valid, gt_boxes, batch["gt_classes"], matchable)
    cls_logits, box_deltas = self.box_head(self.pool(feats, samples["rois"], cfg.pooler.box_resolution))
    out.update(loss_fns.fast_rcnn_losses(cls_logits, box_deltas, samples, smooth_l1_beta=rh.smooth_l1_beta))

    # Mask and keypoint heads on the foreground RoIs, which `sample_rois` puts in the first slots: at most f per
    # image (128 in the 1x schedule), a static shape. Most batches have far fewer (a few ground-truth boxes early in
    # training), so the heads run on the smallest bucket of slots that holds every image's foreground, chosen inside
    # the program by a switch: the losses are the same as on all f slots, the work follows the real RoI count.
    if cfg.mask_head.enabled or cfg.keypoint_head.enabled:
      f = int(rh.batch_size_per_image * rh.positive_fraction)
      caps = foreground_caps(f, rh.foreground_buckets)
      branches = [functools.partial(_foreground_head_losses, cap=c) for c in caps]
      num_fg = jnp.max(jnp.sum(samples["valid"][:, :f] & (samples["classes"][:, :f] > 0), axis=1, dtype=jnp.int32))
      self.sow("intermediates", "max_foreground_rois", num_fg)  # kept only when the caller asks (mutable)
      if len(caps) == 1:
        out.update(branches[0](self, feats, samples, batch))
      else:
        index = jnp.searchsorted(jnp.asarray(caps, jnp.int32), num_fg)  # the smallest cap >= num_fg
        out.update(nn.switch(index, branches, self, feats, samples, batch))
    out["total_loss"] = sum(out.values())
    return out


def foreground_caps(max_foreground: int, buckets) -> tuple[int, ...]:
  """The slot counts the mask and keypoint heads may run on in training: the buckets below `max_foreground`, then
  `max_foreground` itself (always last, so that every batch fits). `buckets` empty: always all of them."""
  buckets = tuple(int(b) for b in buckets)
  if any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
    raise ValueError(f"model.roi_heads.foreground_buckets must be increasing positive slot counts, got {buckets}")
  return tuple(b for b in buckets if b < max_foreground) + (max_foreground,)


def _foreground_head_losses(model, feats, samples, batch, *, cap: int):
  """loss_mask and/or loss_keypoint of the first `cap` RoI slots of each image, which must hold all its foreground."""
  cfg = model.config
  fg = {k: v[:, :cap] for k, v in samples.items()}
  foreground = fg["valid"] & (fg["classes"] > 0)
  out = {}
  if cfg.mask_head.enabled:
    mask_logits = model.mask_head(model.pool(feats, fg["rois"], cfg.pooler.mask_resolution))
    out.update(loss_fns.mask_loss(mask_logits, fg["rois"], fg["classes"], fg["matched"], foreground,
                                  batch["gt_masks"], batch["gt_boxes"], convention=cfg.loss_convention))
  # Keypoint head on the same foreground RoIs, each with its matched instance's keypoints.
  if cfg.keypoint_head.enabled:
    heatmaps = model.keypoint_head(model.pool(feats, fg["rois"], cfg.pooler.keypoint_resolution))
    keypoints = jnp.take_along_axis(batch["gt_keypoints"], fg["matched"][..., None, None], axis=1)
    targets, valid = loss_fns.keypoint_targets(keypoints, fg["rois"], heatmaps.shape[2])
    out.update(loss_fns.keypoint_loss(heatmaps, targets, valid & foreground[..., None]))
  return out


def build_infer(config):
  """A jitted `infer(variables, images, image_info) -> dict` for `config` (the whole ConfigDict)."""
  model = MaskRCNN(config.model)

  @jax.jit
  def infer(variables, images, image_info):
    return model.apply(variables, images, image_info, method=MaskRCNN.infer)

  return infer


def init_variables(config, key, canvas_hw=(128, 128)):
  """Randomly initialized variables of the config's model (shapes do not depend on canvas_hw)."""
  model = MaskRCNN(config.model)
  images = jnp.zeros((1,) + tuple(canvas_hw) + (3,), jnp.float32)
  info = jnp.asarray(np.array([[canvas_hw[0], canvas_hw[1], 1, 1, canvas_hw[0], canvas_hw[1]]], np.float32))
  return jax.jit(functools.partial(model.init, method=MaskRCNN.infer))(key, images, info)
