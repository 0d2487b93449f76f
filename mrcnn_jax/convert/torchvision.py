"""torchvision's maskrcnn_resnet50_fpn / keypointrcnn_resnet50_fpn state dicts -> mrcnn_jax variables.

The result fits the model of configs/mask_rcnn_R50_FPN_torchvision.py (or, for a keypoint state dict,
configs/keypoint_rcnn_R50_FPN_torchvision.py): torchvision's class space (91 ids incl. background, background first),
stride in the 3x3 conv, FrozenBN. torchvision's class axes already have mrcnn_jax's layout (background first, box
deltas for every class, background included), so its predictors are copied as they are. Every key of the state dict
is consumed, or the conversion fails naming it.

A .pth is read with torch when it is installed (`load_state_dict_file`); without torch, an .npz of name -> array
(e.g. written once with `np.savez(path, **{k: v.numpy() for k, v in sd.items()})`) works the same.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

from mrcnn_jax.convert.common import (TreeBuilder, conv_kernel, deconv_kernel, dense_kernel,
                                      fc_after_pool_kernel)

SOURCE = "torchvision"
_BLOCKS = (3, 4, 6, 3)


def _frozen_bn(tb: TreeBuilder, key: str, path: tuple[str, ...]) -> None:
  for src, dst in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
    tb.put("batch_stats", path + (dst,), tb.get(f"{key}.{src}"))
  tb.ignore(f"{key}.num_batches_tracked")


def _conv(tb: TreeBuilder, key: str, path: tuple[str, ...], bias: bool = True) -> None:
  tb.put("params", path + ("kernel",), conv_kernel(tb.get(f"{key}.weight")))
  if bias:
    tb.put("params", path + ("bias",), tb.get(f"{key}.bias"))


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Convert a torchvision Mask/Keypoint R-CNN R50-FPN state dict (name -> array) to {"params", "batch_stats"}."""
  tb = TreeBuilder(state_dict, SOURCE)
  # Backbone: ResNet-50 body, torchvision names layer1..layer4 for res2..res5.
  bb = ("backbone",)
  _conv(tb, "backbone.body.conv1", bb + ("stem_conv",), bias=False)
  _frozen_bn(tb, "backbone.body.bn1", bb + ("stem_norm",))
  for stage, n in enumerate(_BLOCKS):
    for i in range(n):
      src = f"backbone.body.layer{stage + 1}.{i}"
      dst = bb + (f"res{stage + 2}_{i}",)
      for j in (1, 2, 3):
        _conv(tb, f"{src}.conv{j}", dst + (f"conv{j}",), bias=False)
        _frozen_bn(tb, f"{src}.bn{j}", dst + (f"norm{j}",))
      if tb.has(f"{src}.downsample.0.weight"):
        _conv(tb, f"{src}.downsample.0", dst + ("shortcut_conv",), bias=False)
        _frozen_bn(tb, f"{src}.downsample.1", dst + ("shortcut_norm",))
  # FPN: inner_blocks (lateral 1x1) and layer_blocks (output 3x3), index 0 = C2.
  for i in range(4):
    _conv(tb, f"backbone.fpn.inner_blocks.{i}.0", ("fpn", f"lateral{i + 2}"))
    _conv(tb, f"backbone.fpn.layer_blocks.{i}.0", ("fpn", f"output{i + 2}"))
  # RPN.
  _conv(tb, "rpn.head.conv.0.0", ("rpn", "conv"))
  _conv(tb, "rpn.head.cls_logits", ("rpn", "objectness"))
  _conv(tb, "rpn.head.bbox_pred", ("rpn", "deltas"))
  # Box head: fc6 reads the (C, 7, 7)-flattened RoI features.
  fc6 = tb.get("roi_heads.box_head.fc6.weight")
  tb.put("params", ("box_head", "fc1", "kernel"), fc_after_pool_kernel(fc6, 256, int(round((fc6.shape[1] / 256) ** 0.5))))
  tb.put("params", ("box_head", "fc1", "bias"), tb.get("roi_heads.box_head.fc6.bias"))
  for src, dst in (("box_head.fc7", "fc2"), ("box_predictor.cls_score", "cls_score"),
                   ("box_predictor.bbox_pred", "bbox_pred")):
    tb.put("params", ("box_head", dst, "kernel"), dense_kernel(tb.get(f"roi_heads.{src}.weight")))
    tb.put("params", ("box_head", dst, "bias"), tb.get(f"roi_heads.{src}.bias"))
  # Mask head (absent in a keypoint state dict).
  if tb.has("roi_heads.mask_head.0.0.weight"):
    for i in range(4):
      _conv(tb, f"roi_heads.mask_head.{i}.0", ("mask_head", f"conv{i + 1}"))
    tb.put("params", ("mask_head", "deconv", "kernel"),
           deconv_kernel(tb.get("roi_heads.mask_predictor.conv5_mask.weight")))
    tb.put("params", ("mask_head", "deconv", "bias"), tb.get("roi_heads.mask_predictor.conv5_mask.bias"))
    _conv(tb, "roi_heads.mask_predictor.mask_fcn_logits", ("mask_head", "predictor"))
  # Keypoint head: 8 convs at Sequential indices 0, 2, ..., 14 (ReLUs between), then the 4x4 deconv.
  if tb.has("roi_heads.keypoint_head.0.weight"):
    for i in range(8):
      _conv(tb, f"roi_heads.keypoint_head.{2 * i}", ("keypoint_head", f"conv{i + 1}"))
    tb.put("params", ("keypoint_head", "deconv", "kernel"),
           deconv_kernel(tb.get("roi_heads.keypoint_predictor.kps_score_lowres.weight")))
    tb.put("params", ("keypoint_head", "deconv", "bias"),
           tb.get("roi_heads.keypoint_predictor.kps_score_lowres.bias"))
  unused = tb.unused()
  if unused:
    raise ValueError(f"{SOURCE}: {len(unused)} keys of the state dict were not converted: {unused[:20]}")
  return tb.variables


def load_state_dict_file(path) -> dict[str, np.ndarray]:
  """Read name -> numpy array from a .pth/.pt (needs torch) or an .npz."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such checkpoint file: {path}")
  if path.suffix == ".npz":
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path} needs torch; or convert it once to .npz where torch is installed") from None
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
    sd = sd["model"]
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}
