"""Mask R-CNN (He et al., 2017) and Keypoint R-CNN: the whole model, as one Flax module.

I/O contract:
- `MaskRCNN.infer(images (B, H, W, 3) float32 normalized, image_info (B, 6) float32)` -> dict of fixed-size arrays
  (D = detections per image): boxes (B, D, 4) XYXY in input (canvas) pixels, scores (B, D), classes (B, D) int32 in
  1..K, valid (B, D) bool; masks (B, D, 28, 28) float32 probabilities of each detection's class when the mask head
  is on; keypoints (B, D, 17, 3) (x, y, score) when the keypoint head is on. One jitted program.
  image_info rows are [valid_h, valid_w, scale_h, scale_w, orig_h, orig_w] (see `data.transforms.preprocess`).
- `MaskRCNN.losses(batch, key)` (train mode) -> dict of named losses (Detectron2's names: loss_rpn_cls,
  loss_rpn_loc, loss_cls, loss_box_reg, loss_mask, loss_keypoint) and total_loss; batch is the dict of fixed-shape arrays of
  `data.examples.train_example` (image, image_info, gt_boxes, gt_classes, gt_valid, gt_is_crowd, gt_masks, ...).

Variables: `params` (everything trained) and `batch_stats` (frozen / running norm statistics).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.data import transforms
from mrcnn_jax.modeling import losses as loss_fns
from mrcnn_jax.modeling.box_head import BoxHead, detect
from mrcnn_jax.modeling.fpn import FPN
from mrcnn_jax.modeling.keypoint_head import KeypointHead, heatmaps_to_keypoints
from mrcnn_jax.modeling.mask_head import MaskHead
from mrcnn_jax.modeling.resnet import ResNet
from mrcnn_jax.modeling.rpn import RPNHead, generate_proposals
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops import frames as frame_ops
from mrcnn_jax.ops import matching
from mrcnn_jax.ops import roi_align as roi_ops

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_cfg):
  try:
    return _DTYPES[model_cfg.compute_dtype]
  except KeyError:
    raise ValueError(f"model.compute_dtype {model_cfg.compute_dtype!r} is not one of {sorted(_DTYPES)}") from None


class MaskRCNN(nn.Module):
  """The model of a config's `model` section (see configs/mask_rcnn_R50_FPN_1x.py for the fields).

  Every image is computed inside its own frame (`ops.frames`): its valid size from image_info rounded up to
  `model.size_divisibility`. So its outputs do not depend on the canvas it is padded to, nor on its batch mates.
  max_canvas_side: the longest canvas side of the config (`build_model` sets it from `input.canvases`), which bounds
  the adaptive RoIAlign's samples per bin (`sampling_bound`); 0 takes this program's canvas.
  """

  config: object  # ml_collections.ConfigDict (model section); read-only here
  train: bool = False
  max_canvas_side: int = 0

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

  def frames(self, image_info):
    """(B, 6) image_info -> (B, 2) int32: each image's frame, its valid size rounded up to size_divisibility."""
    return frame_ops.image_frames(image_info[:, :2], self.config.size_divisibility)

  def features(self, images, frames=None):
    """images (B, H, W, 3), frames (B, 2) int32 or None (the whole canvas) -> {2..6: (B, H/2**l, W/2**l, C)}."""
    return self.fpn(self.backbone(images, frames), frames)

  def _levels(self):
    return range(self.config.fpn.min_level, self.config.fpn.max_level + 1)

  def anchors(self, canvas_hw, frames):
    """Each image's anchors on the canvas and which lie in its frame: lists over levels of (B, N_l, 4), (B, N_l)."""
    a = self.config.anchors
    return anchor_ops.frame_anchors(tuple(canvas_hw), frames, tuple(2**l for l in self._levels()),
                                    tuple(tuple(s) for s in a.sizes), tuple(a.aspect_ratios), float(a.offset),
                                    a.convention, self.config.size_divisibility)

  def rpn_outputs(self, feats, frames):
    """RPN logits and deltas, lists over levels of (B, N_l) and (B, N_l, 4)."""
    levels = self._levels()
    return self.rpn([feats[l] for l in levels], frames, [2**l for l in levels])

  def pool(self, feats, boxes, resolution: int, frames=None):
    """Multi-level RoIAlign over the pooler's levels (P2..P5). boxes (B, R, 4) -> (B, R, res, res, C)."""
    p = self.config.pooler
    min_level = self.config.fpn.min_level
    levels = [feats[l] for l in range(min_level, p.max_level + 1)]
    canvas_side = max(feats[min_level].shape[1:3]) * 2**min_level
    bound = sampling_bound(self.config, resolution, self.max_canvas_side or canvas_side)
    return roi_ops.multilevel_roi_align(
        levels, boxes, resolution, p.sampling_ratio, p.aligned, min_level, p.canonical_size,
        p.canonical_level, level_convention=p.level_convention, max_sampling_ratio=bound, impl=p.impl,
        frames=frames)

  def proposals(self, feats, image_hw, canvas_hw, frames=None):
    """RPN proposals at test time: boxes (B, P, 4), scores (B, P), valid (B, P)."""
    cfg = self.config.rpn
    if frames is None:
      frames = jnp.broadcast_to(jnp.asarray(canvas_hw, jnp.int32), (image_hw.shape[0], 2))
    logits, deltas = self.rpn_outputs(feats, frames)
    anchors, anchor_valid = self.anchors(canvas_hw, frames)
    return generate_proposals(
        logits, deltas, anchors, image_hw,
        pre_nms_topk=cfg.pre_nms_topk_train if self.train else cfg.pre_nms_topk_test,
        post_nms_topk=cfg.post_nms_topk_train if self.train else cfg.post_nms_topk_test,
        nms_thresh=cfg.nms_thresh, min_size=cfg.min_size, score_thresh=cfg.score_thresh,
        box_weights=tuple(cfg.box_weights), sigmoid_scores=cfg.sigmoid_scores, anchor_valid=anchor_valid)

  # -- inference ----------------------------------------------------------------------------------------------------

  def infer(self, images, image_info):
    cfg = self.config
    image_hw = image_info[:, :2]
    frames = self.frames(image_info)
    feats = self.features(images, frames)
    boxes, _, valid = self.proposals(feats, image_hw, images.shape[1:3], frames)
    logits, deltas = self.box_head(self.pool(feats, boxes, cfg.pooler.box_resolution, frames))
    rh = cfg.roi_heads
    out = detect(logits, deltas, boxes, valid, image_hw, score_thresh=rh.score_thresh_test,
                 nms_thresh=rh.nms_thresh_test, detections_per_image=rh.detections_per_image,
                 min_box_size=rh.min_box_size_test, box_weights=tuple(rh.box_weights))
    out["proposals"], out["proposal_valid"] = boxes, valid
    if cfg.mask_head.enabled:
      pooled = self.pool(feats, out["boxes"], cfg.pooler.mask_resolution, frames)
      out["masks"] = nn.sigmoid(self.mask_head(pooled, out["classes"]))  # each detection's own class's map
    if cfg.keypoint_head.enabled:
      heatmaps = self.keypoint_head(self.pool(feats, out["boxes"], cfg.pooler.keypoint_resolution, frames))
      out["keypoints"] = heatmaps_to_keypoints(heatmaps, out["boxes"], images.shape[1:3])
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
    frames = self.frames(batch["image_info"])
    feats = self.features(images, frames)

    # RPN: targets for every anchor of every level at once; anchors outside an image's frame take no part.
    r = cfg.rpn
    logits, deltas = self.rpn_outputs(feats, frames)
    level_anchors, level_valid = self.anchors(images.shape[1:3], frames)
    anchor_valid = jnp.concatenate(level_valid, axis=1)
    matcher = matching.Matcher(tuple(r.iou_thresholds), tuple(r.iou_labels), True)
    if all(isinstance(a, np.ndarray) for a in level_anchors):  # shared by every image: one constant
      anchors, anchor_axis = np.concatenate(level_anchors, axis=0), None
    else:
      anchors = jnp.concatenate([jnp.broadcast_to(a, (b,) + a.shape) if a.ndim == 2 else a for a in level_anchors],
                                axis=1)
      anchor_axis = 0
    targets = jax.vmap(lambda k, a, v, g, m: loss_fns.rpn_targets(
        k, a, g, m, matcher=matcher, batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction, box_weights=tuple(r.box_weights), anchor_valid=v),
        in_axes=(0, anchor_axis, 0, 0, 0))(jax.random.split(rpn_key, b), anchors, anchor_valid, gt_boxes, matchable)
    beta = r.smooth_l1_beta if r.loss_type == "smooth_l1" else 0.0
    out = loss_fns.rpn_losses(jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1), *targets,
                              batch_size_per_image=r.batch_size_per_image, smooth_l1_beta=beta,
                              convention=convention)

    # Proposals (no gradient flows into them, as in both reference implementations).
    proposals, _, proposal_valid = generate_proposals(
        [jax.lax.stop_gradient(x) for x in logits], [jax.lax.stop_gradient(x) for x in deltas], level_anchors,
        image_hw, pre_nms_topk=r.pre_nms_topk_train, post_nms_topk=r.post_nms_topk_train, nms_thresh=r.nms_thresh,
        min_size=r.min_size, score_thresh=r.score_thresh, box_weights=tuple(r.box_weights),
        sigmoid_scores=r.sigmoid_scores, anchor_valid=level_valid)

    # Box head on sampled RoIs.
    rh = cfg.roi_heads
    samples = jax.vmap(lambda k, p, v, g, c, m: loss_fns.sample_rois(
        k, p, v, g, c, m, iou_threshold=rh.iou_threshold, batch_size_per_image=rh.batch_size_per_image,
        positive_fraction=rh.positive_fraction, append_gt=rh.proposal_append_gt,
        box_weights=tuple(rh.box_weights)))(
            jax.random.split(roi_key, b), proposals, proposal_valid, gt_boxes, batch["gt_classes"], matchable)
    cls_logits, box_deltas = self.box_head(self.pool(feats, samples["rois"], cfg.pooler.box_resolution, frames))
    out.update(loss_fns.fast_rcnn_losses(cls_logits, box_deltas, samples, smooth_l1_beta=rh.smooth_l1_beta))

    # Mask and keypoint heads on the foreground RoIs, which `sample_rois` puts in the first slots: at most f per
    # image (128 in the 1x schedule), a static shape. Most batches have far fewer (a few ground-truth boxes early in
    # training), so the heads run on the smallest bucket of slots that holds every image's foreground, chosen inside
    # the program by a switch: the losses are the same as on all f slots, the work follows the real RoI count.
    if cfg.mask_head.enabled or cfg.keypoint_head.enabled:
      f = int(rh.batch_size_per_image * rh.positive_fraction)
      caps = foreground_caps(f, rh.foreground_buckets)
      branches = [functools.partial(_foreground_head_losses, cap=c, frames=frames) for c in caps]
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


def _foreground_head_losses(model, feats, samples, batch, *, cap: int, frames):
  """loss_mask and/or loss_keypoint of the first `cap` RoI slots of each image, which must hold all its foreground."""
  cfg = model.config
  fg = {k: v[:, :cap] for k, v in samples.items()}
  foreground = fg["valid"] & (fg["classes"] > 0)
  out = {}
  if cfg.mask_head.enabled:
    mask_logits = model.mask_head(model.pool(feats, fg["rois"], cfg.pooler.mask_resolution, frames))
    out.update(loss_fns.mask_loss(mask_logits, fg["rois"], fg["classes"], fg["matched"], foreground,
                                  batch["gt_masks"], batch["gt_boxes"], convention=cfg.loss_convention))
  # Keypoint head on the same foreground RoIs, each with its matched instance's keypoints.
  if cfg.keypoint_head.enabled:
    heatmaps = model.keypoint_head(model.pool(feats, fg["rois"], cfg.pooler.keypoint_resolution, frames))
    keypoints = jnp.take_along_axis(batch["gt_keypoints"], fg["matched"][..., None, None], axis=1)
    targets, valid = loss_fns.keypoint_targets(keypoints, fg["rois"], heatmaps.shape[2])
    out.update(loss_fns.keypoint_loss(heatmaps, targets, valid & foreground[..., None]))
  return out


def sampling_bound(model_cfg, resolution: int, max_canvas_side: int) -> int:
  """The static bound of RoIAlign's samples per bin and axis: `pooler.max_sampling_ratio` when set, else (the
  adaptive form, sampling_ratio <= 0) what the largest RoI of the top pooling level needs on the largest canvas,
  ceil(max_canvas_side / 2**pooler.max_level / resolution): 6 for a 7x7 box head and 3 for 14x14 masks on a
  1344-pixel canvas. Every RoI needing at most that many samples per axis is pooled exactly; a longer one (an
  elongated box assigned to a lower level) with that many evenly spaced samples. Fixed sampling ratios are exact.
  """
  p = model_cfg.pooler
  if p.sampling_ratio > 0:
    return int(p.sampling_ratio)
  if p.max_sampling_ratio:
    return int(p.max_sampling_ratio)
  return max(1, math.ceil(max_canvas_side / 2**p.max_level / resolution))


def max_canvas_side(config) -> int:
  """The longest side of the config's canvases (`input.canvases`), which must be multiples of
  model.size_divisibility (ValueError naming both otherwise)."""
  d = int(config.model.size_divisibility)
  canvas_list = transforms.canvases(config.input)
  odd = [f"{h}x{w}" for h, w in canvas_list if h % d or w % d]
  if odd:
    raise ValueError(f"input.canvases {', '.join(odd)} are not multiples of model.size_divisibility {d}")
  return max(max(hw) for hw in canvas_list)


def build_model(config, *, train: bool = False) -> MaskRCNN:
  """The MaskRCNN of a whole config (its `model` section, and the canvases that bound its adaptive RoIAlign)."""
  return MaskRCNN(config.model, train=train, max_canvas_side=max_canvas_side(config))


def build_infer(config, compiler_options: dict | None = None):
  """A jitted `infer(variables, images, image_info) -> dict` for `config` (the whole ConfigDict). It compiles once per
  canvas (images shape) it is called with.

  compiler_options: passed to `jax.jit`. JAX takes them on a top-level program only (a jitted function with
  options cannot be called inside another jit), so the default is none and a program that runs on its own adds
  them: `Predictor` jits this with `cpu.compiler.inference_options()` (10-13% faster on CPU), and so does the
  benchmark.
  """
  model = build_model(config)

  @functools.partial(jax.jit, compiler_options=compiler_options)
  def infer(variables, images, image_info):
    return model.apply(variables, images, image_info, method=MaskRCNN.infer)

  return infer


def init_variables(config, key, canvas_hw=(128, 128)):
  """Randomly initialized variables of the config's model (shapes do not depend on canvas_hw)."""
  model = build_model(config)
  images = jnp.zeros((1,) + tuple(canvas_hw) + (3,), jnp.float32)
  info = jnp.asarray(np.array([[canvas_hw[0], canvas_hw[1], 1, 1, canvas_hw[0], canvas_hw[1]]], np.float32))
  return jax.jit(functools.partial(model.init, method=MaskRCNN.infer))(key, images, info)


def random_variables(config, seed: int = 0):
  """Variables of the config's model drawn on the host with numpy at flax's initializer scales (kernels
  N(0, 1 / fan_in), biases 0, norms the identity): random weights without an init program to compile (an R50's
  compiles for tens of seconds), for benchmarks and tests. Not `init_variables`' values."""
  shapes = jax.eval_shape(lambda k: init_variables(config, k, (64, 64)), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, spec):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      return (rng.standard_normal(spec.shape, np.float32) / math.sqrt(math.prod(spec.shape[:-1]))).astype(spec.dtype)
    return (np.ones if name in ("scale", "var") else np.zeros)(spec.shape, spec.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
