"""Detectron2 model-zoo checkpoints and the MSRA/Detectron (Caffe2) ImageNet backbones -> mrcnn_jax variables.

Two sources, one ResNet layout:

- `convert_state_dict`: a Detectron2 GeneralizedRCNN state (names such as `backbone.bottom_up.res2.0.conv1.weight`,
  `roi_heads.box_predictor.cls_score.weight`) -> the whole model's {"params", "batch_stats"}. It fits the model of
  configs/mask_rcnn_R50_FPN_1x.py (R50 or R101 backbone, mask head) or configs/keypoint_rcnn_R50_FPN_1x.py (keypoint
  head, one class). Detectron2 puts the background logit last and has no background box deltas or mask channel;
  mrcnn_jax keeps background at index 0 of every class axis, so rows move and zeros fill the background slots (the
  layout is read from the arrays' shapes; a class-agnostic box regressor has no counterpart and is refused).
- `convert_msra_backbone`: the ImageNet classifiers Detectron2 starts from (R-50.pkl, R-101.pkl: Caffe2 names such
  as `res2_0_branch2a_w`, AffineChannel instead of batch norm) -> the `backbone` subtree only; the heads are
  initialized fresh when fine-tuning.

Every key of the input is consumed (converted, or dropped on purpose and reported), or the conversion fails naming
the keys left over; an array whose shape does not fit the architecture fails naming its key. A model-zoo .pkl is a
pickle of numpy arrays, read here without torch by `load_pickle`.
"""

from __future__ import annotations

import logging
import pathlib
import pickle
import re
from collections.abc import Mapping

import numpy as np

from mrcnn_jax.convert.common import TreeBuilder, conv_kernel, deconv_kernel, dense_kernel, fc_after_pool_kernel
from mrcnn_jax.modeling.resnet import STAGE_BLOCKS, STAGE_WIDTHS

SOURCE = "detectron2"
MSRA_SOURCE = "MSRA backbone"
_LEVELS = (2, 3, 4, 5)  # res2..res5
_STEM_WIDTH = 64

log = logging.getLogger(__name__)


# -- reading a .pkl ---------------------------------------------------------------------------------------------------

# The only globals a pickle of numpy arrays refers to. Anything else (torch tensors, arbitrary classes) is refused
# before it runs: unpickling can execute code, and these files come from the internet.
_NUMPY_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how Python 3 writes bytes (an array's buffer) in protocol 2
}


class _NumpyUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    # Pickles written before numpy 2 name numpy.core, which numpy 2 renamed numpy._core.
    module = re.sub(r"^numpy\.core\b", "numpy._core", module)
    if (module, name) not in _NUMPY_GLOBALS:
      raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not part of a pickle of numpy arrays")
    if module.startswith("numpy._core") and not hasattr(np, "_core"):  # numpy 1.x
      module = module.replace("numpy._core", "numpy.core", 1)
    return super().find_class(module, name)


def load_pickle(path) -> dict[str, np.ndarray]:
  """A model-zoo .pkl -> its flat name -> numpy array dict.

  Detectron2's files hold {"model": {name: array}, "__author__": ..., ...}; Detectron (Caffe2) detection models
  {"blobs": {name: array}, "cfg": ...}; the MSRA ImageNet backbones a flat {name: array}. The file is read as a
  Python 2-compatible (latin1) pickle that may refer to numpy only.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such checkpoint file: {path}")
  try:
    with open(path, "rb") as f:
      data = _NumpyUnpickler(f, encoding="latin1").load()
  except Exception as e:  # pickle raises many types for a file that is not one (UnpicklingError, EOFError, ...)
    raise ValueError(f"{path} is not a pickle of numpy arrays (a Detectron2/Caffe2 .pkl): {e}") from e
  if not isinstance(data, Mapping):
    raise ValueError(f"{path} holds a {type(data).__name__}, not a dict of weights")
  for wrapper in ("model", "blobs"):
    if isinstance(data.get(wrapper), Mapping):
      weights, where = data[wrapper], f"{path}[{wrapper!r}]"
      break
  else:
    weights, where = data, str(path)
  is_array = lambda v: isinstance(v, (np.ndarray, np.generic)) and np.issubdtype(v.dtype, np.number)  # noqa: E731
  if not any(is_array(v) for v in weights.values()):
    raise ValueError(f"{where} holds no weights (top-level keys: {sorted(map(str, data))[:10]})")
  bad = [k for k, v in weights.items() if not is_array(v)]
  if bad:
    raise ValueError(f"{where}: {bad[:10]} are not numeric arrays; is this a weights file?")
  return {str(k): np.asarray(v) for k, v in weights.items()}


# -- shared helpers ---------------------------------------------------------------------------------------------------


def _take(tb: TreeBuilder, key: str, shape: tuple[int, ...]) -> np.ndarray:
  """The array under `key`, which must have `shape` (the source framework's layout)."""
  value = tb.get(key)
  if tuple(value.shape) != tuple(shape):
    raise ValueError(f"{tb.source}: {key} has shape {tuple(value.shape)}; the architecture expects {tuple(shape)}")
  return value


def _count(tb: TreeBuilder, pattern: str, start: int) -> int:
  """How many of pattern.format(start), pattern.format(start + 1), ... are in the state, counting up to a gap."""
  n = 0
  while tb.has(pattern.format(start + n)):
    n += 1
  return n


def _resnet_convs(depth: int):
  """Every conv of the ResNet with its norm, in order.

  Yields (block, conv, in_channels, out_channels, kernel): block "stem" or (level, index), conv "conv1".."conv3" or
  "shortcut" (a block's first conv of a stage, where channels or stride change).
  """
  yield "stem", "conv1", 3, _STEM_WIDTH, 7
  in_ch = _STEM_WIDTH
  for level, blocks, width in zip(_LEVELS, STAGE_BLOCKS[depth], STAGE_WIDTHS):
    for i in range(blocks):
      if i == 0:
        yield (level, i), "shortcut", in_ch, 4 * width, 1
      yield (level, i), "conv1", in_ch, width, 1
      yield (level, i), "conv2", width, width, 3
      yield (level, i), "conv3", width, 4 * width, 1
      in_ch = 4 * width


def _backbone_path(block, conv: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """mrcnn_jax paths (conv, norm) of a conv yielded by `_resnet_convs`."""
  if block == "stem":
    return ("backbone", "stem_conv"), ("backbone", "stem_norm")
  node = ("backbone", f"res{block[0]}_{block[1]}")
  if conv == "shortcut":
    return node + ("shortcut_conv",), node + ("shortcut_norm",)
  return node + (conv,), node + (f"norm{conv[-1]}",)


def _depth_from_blocks(tb: TreeBuilder, pattern: str) -> int:
  """The ResNet depth whose blocks per stage are those in the state (pattern.format(level, index))."""
  counts = tuple(_count(tb, pattern.replace("{level}", str(level)), 0) for level in _LEVELS)
  for depth, blocks in STAGE_BLOCKS.items():
    if counts == tuple(blocks):
      return depth
  raise ValueError(f"{tb.source}: the checkpoint has {counts} blocks in res2..res5; supported ResNets have "
                   f"{dict(STAGE_BLOCKS)}")


def _background_first(rows: np.ndarray) -> np.ndarray:
  """(K+1, ...) class rows with background last (Detectron2) -> background first (mrcnn_jax)."""
  return np.concatenate([rows[-1:], rows[:-1]])


def _with_background_slot(rows: np.ndarray, per_class: int) -> np.ndarray:
  """(K*per_class, ...) rows for the foreground classes -> ((K+1)*per_class, ...) with zeros for background first:
  the background box deltas and mask channel are never read, and zeros keep them harmless."""
  return np.concatenate([np.zeros((per_class,) + rows.shape[1:], rows.dtype), rows])


def _finish(tb: TreeBuilder, dropped: list[str], extras: dict, return_extras: bool):
  unused = tb.unused()
  if unused:
    raise ValueError(f"{tb.source}: {len(unused)} keys of the checkpoint were not converted: {unused[:20]}"
                     f"{' ...' if len(unused) > 20 else ''}")
  if dropped:
    log.info("%s: dropped %d keys that the model has no use for: %s", tb.source, len(dropped), dropped)
  if return_extras:
    return tb.variables, {**extras, "dropped": dropped}
  return tb.variables


# -- Detectron2 models ------------------------------------------------------------------------------------------------


def _d2_frozen_bn(tb: TreeBuilder, key: str, path: tuple[str, ...], channels: int) -> None:
  for src, dst in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
    tb.put("batch_stats", path + (dst,), _take(tb, f"{key}.{src}", (channels,)))
  tb.ignore(f"{key}.num_batches_tracked")


def _d2_conv(tb: TreeBuilder, key: str, path: tuple[str, ...], out_ch: int, in_ch: int, k: int, bias=True) -> None:
  tb.put("params", path + ("kernel",), conv_kernel(_take(tb, f"{key}.weight", (out_ch, in_ch, k, k))))
  if bias:
    tb.put("params", path + ("bias",), _take(tb, f"{key}.bias", (out_ch,)))


def _d2_dense(tb: TreeBuilder, key: str, path: tuple[str, ...], out_dim: int, in_dim: int) -> None:
  tb.put("params", path + ("kernel",), dense_kernel(_take(tb, f"{key}.weight", (out_dim, in_dim))))
  tb.put("params", path + ("bias",), _take(tb, f"{key}.bias", (out_dim,)))


def convert_state_dict(state: Mapping[str, np.ndarray], *, return_extras: bool = False):
  """Convert a Detectron2 Mask R-CNN / Keypoint R-CNN (ResNet-FPN) state to mrcnn_jax variables.

  Args:
    state: name -> array in torch layouts (`load_pickle` of a model-zoo .pkl). The ResNet depth, the number of
      classes K, anchors per location, head widths and which heads are present are read from it; every other array
      must fit them.
    return_extras: also return a dict of what is not a variable: "pixel_mean" and "pixel_std" ((3,) float32, in the
      weights' channel order, BGR for the model zoo) when the state carries them (older checkpoints do), for the
      caller to check against the config's `input` section; "dropped", the keys consumed without conversion.

  Returns:
    {"params": ..., "batch_stats": ...} of numpy float32 arrays, or (variables, extras) with return_extras.
    Class axes have background at 0: cls_score (D, K+1), bbox_pred (D, 4(K+1)), mask predictor (1, 1, M, K+1).
  """
  tb = TreeBuilder(state, SOURCE)
  extras, dropped = _d2_extras(tb)
  _d2_backbone(tb)
  channels = _d2_fpn(tb)
  _d2_rpn(tb, channels)
  fc_dim = _d2_box_head(tb, channels)
  num_classes = _d2_box_predictor(tb, fc_dim)
  if tb.has("roi_heads.mask_head.mask_fcn1.weight"):  # absent in keypoint models
    _d2_mask_head(tb, channels, num_classes)
  if tb.has("roi_heads.keypoint_head.conv_fcn1.weight"):
    _d2_keypoint_head(tb, channels)
  return _finish(tb, dropped, extras, return_extras)


def _d2_extras(tb: TreeBuilder) -> tuple[dict, list[str]]:
  """What the state holds besides variables: (extras with "pixel_mean" / "pixel_std" when present, the keys consumed
  without conversion)."""
  extras, dropped = {}, []
  for name in ("pixel_mean", "pixel_std"):
    if tb.has(name):  # GeneralizedRCNN buffers of shape (3, 1, 1); persistent only in older Detectron2 versions
      extras[name] = np.asarray(_take(tb, name, (3, 1, 1)), np.float32).reshape(3)
  # Anchors were persistent buffers in old checkpoints; Detectron2 recomputes them from its config, as we do.
  for key in [k for k in tb.state if re.fullmatch(r"proposal_generator\.anchor_generator\.cell_anchors\.\d+", k)]:
    tb.ignore(key)
    dropped.append(key)
  return extras, dropped


def _d2_backbone(tb: TreeBuilder) -> None:
  """The ResNet (Detectron2's "bottom_up"), its depth from the number of blocks per stage; FrozenBN after every
  conv."""
  depth = _depth_from_blocks(tb, "backbone.bottom_up.res{level}.{}.conv1.weight")
  for block, conv, in_ch, out_ch, k in _resnet_convs(depth):
    key = ("backbone.bottom_up.stem.conv1" if block == "stem"
           else f"backbone.bottom_up.res{block[0]}.{block[1]}.{conv}")
    conv_path, norm_path = _backbone_path(block, conv)
    _d2_conv(tb, key, conv_path, out_ch, in_ch, k, bias=False)
    _d2_frozen_bn(tb, f"{key}.norm", norm_path, out_ch)


def _d2_fpn(tb: TreeBuilder) -> int:
  """The FPN's lateral 1x1 and output 3x3 convs per level, all of `channels` outputs; returns channels."""
  channels = tb.get("backbone.fpn_lateral2.weight").shape[0]
  for level, width in zip(_LEVELS, STAGE_WIDTHS):
    _d2_conv(tb, f"backbone.fpn_lateral{level}", ("fpn", f"lateral{level}"), channels, 4 * width, 1)
    _d2_conv(tb, f"backbone.fpn_output{level}", ("fpn", f"output{level}"), channels, channels, 3)
  return channels


def _d2_rpn(tb: TreeBuilder, channels: int) -> None:
  """The RPN: a shared 3x3 conv, then per anchor one objectness logit and 4 deltas."""
  rpn = "proposal_generator.rpn_head"
  anchors = tb.get(f"{rpn}.objectness_logits.weight").shape[0]
  _d2_conv(tb, f"{rpn}.conv", ("rpn", "conv"), channels, channels, 3)
  _d2_conv(tb, f"{rpn}.objectness_logits", ("rpn", "objectness"), anchors, channels, 1)
  _d2_conv(tb, f"{rpn}.anchor_deltas", ("rpn", "deltas"), 4 * anchors, channels, 1)


def _d2_box_head(tb: TreeBuilder, channels: int) -> int:
  """The box head's two FCs; fc1 reads RoI features flattened (C, R, R) by torch, (R, R, C) by mrcnn_jax. Returns
  the FC width."""
  fc_dim, fc_in = tb.get("roi_heads.box_head.fc1.weight").shape
  resolution = int(round((fc_in / channels) ** 0.5))
  if resolution * resolution * channels != fc_in:
    raise ValueError(f"{SOURCE}: roi_heads.box_head.fc1.weight reads {fc_in} inputs, not {channels} x R x R")
  fc1 = _take(tb, "roi_heads.box_head.fc1.weight", (fc_dim, fc_in))
  tb.put("params", ("box_head", "fc1", "kernel"), fc_after_pool_kernel(fc1, channels, resolution))
  tb.put("params", ("box_head", "fc1", "bias"), _take(tb, "roi_heads.box_head.fc1.bias", (fc_dim,)))
  _d2_dense(tb, "roi_heads.box_head.fc2", ("box_head", "fc2"), fc_dim, fc_dim)
  return fc_dim


def _d2_box_predictor(tb: TreeBuilder, fc_dim: int) -> int:
  """The box predictor, to background first: K + 1 logits with background last; 4 deltas per foreground class (no
  background deltas; a class-agnostic regressor, 4 deltas in all, has no counterpart in the model and fails here).
  Returns K."""
  predictor = "roi_heads.box_predictor"
  num_classes = tb.get(f"{predictor}.cls_score.weight").shape[0] - 1
  cls_w = _take(tb, f"{predictor}.cls_score.weight", (num_classes + 1, fc_dim))
  cls_b = _take(tb, f"{predictor}.cls_score.bias", (num_classes + 1,))
  tb.put("params", ("box_head", "cls_score", "kernel"), dense_kernel(_background_first(cls_w)))
  tb.put("params", ("box_head", "cls_score", "bias"), _background_first(cls_b))
  box_w = _take(tb, f"{predictor}.bbox_pred.weight", (4 * num_classes, fc_dim))
  box_b = _take(tb, f"{predictor}.bbox_pred.bias", (4 * num_classes,))
  tb.put("params", ("box_head", "bbox_pred", "kernel"), dense_kernel(_with_background_slot(box_w, 4)))
  tb.put("params", ("box_head", "bbox_pred", "bias"), _with_background_slot(box_b, 4))
  return num_classes


def _d2_conv_tower(tb: TreeBuilder, key: str, head: str, channels: int) -> int:
  """A head's 3x3 convs `key`1, `key`2, ... (as many as the state holds) -> head/conv1, head/conv2, ...; the first
  reads `channels`, the others the tower's width. Returns the width."""
  dim = tb.get(f"{key}1.weight").shape[0]
  for i in range(1, _count(tb, key + "{}.weight", 1) + 1):
    _d2_conv(tb, f"{key}{i}", (head, f"conv{i}"), dim, channels if i == 1 else dim, 3)
  return dim


def _d2_mask_head(tb: TreeBuilder, channels: int, num_classes: int) -> None:
  """The mask head: convs, the 2x2 stride-2 deconv, a 1x1 conv with one channel per foreground class (a zero
  background channel added first)."""
  mask = "roi_heads.mask_head"
  dim = _d2_conv_tower(tb, f"{mask}.mask_fcn", "mask_head", channels)
  deconv = _take(tb, f"{mask}.deconv.weight", (dim, dim, 2, 2))  # ConvTranspose2d: (in, out, kh, kw)
  tb.put("params", ("mask_head", "deconv", "kernel"), deconv_kernel(deconv))
  tb.put("params", ("mask_head", "deconv", "bias"), _take(tb, f"{mask}.deconv.bias", (dim,)))
  mask_w = _take(tb, f"{mask}.predictor.weight", (num_classes, dim, 1, 1))
  mask_b = _take(tb, f"{mask}.predictor.bias", (num_classes,))
  tb.put("params", ("mask_head", "predictor", "kernel"), conv_kernel(_with_background_slot(mask_w, 1)))
  tb.put("params", ("mask_head", "predictor", "bias"), _with_background_slot(mask_b, 1))


def _d2_keypoint_head(tb: TreeBuilder, channels: int) -> None:
  """The keypoint head: 3x3 convs conv_fcn1.., then the 4x4 stride-2 deconv to one heatmap per keypoint."""
  kp = "roi_heads.keypoint_head"
  dim = _d2_conv_tower(tb, f"{kp}.conv_fcn", "keypoint_head", channels)
  num_keypoints = tb.get(f"{kp}.score_lowres.weight").shape[1]
  deconv = _take(tb, f"{kp}.score_lowres.weight", (dim, num_keypoints, 4, 4))  # (in, out, kh, kw)
  tb.put("params", ("keypoint_head", "deconv", "kernel"), deconv_kernel(deconv))
  tb.put("params", ("keypoint_head", "deconv", "bias"), _take(tb, f"{kp}.score_lowres.bias", (num_keypoints,)))


# -- MSRA / Detectron (Caffe2) ImageNet backbones ---------------------------------------------------------------------


def _affine_as_frozen_bn_var(eps: float) -> np.float32:
  """The variance v with float32(v + eps) == 1 exactly, so that FrozenBN's scale / sqrt(v + eps) is the
  AffineChannel scale itself (Detectron2 initializes FrozenBN's running_var to 1 - eps for the same reason)."""
  var, eps32 = np.float32(1 - eps), np.float32(eps)
  while var + eps32 > np.float32(1):
    var = np.nextafter(var, np.float32(0))
  while var + eps32 < np.float32(1):
    var = np.nextafter(var, np.float32(2))
  return var


def convert_msra_backbone(blobs: Mapping[str, np.ndarray], depth: int, *, eps: float = 1e-5,
                          return_extras: bool = False):
  """Convert the MSRA ImageNet ResNet (Caffe2 names, AffineChannel norms) to the mrcnn_jax `backbone` subtree.

  Args:
    blobs: name -> array (`load_pickle` of R-50.pkl / R-101.pkl): conv1_w, res_conv1_bn_{s,b},
      res{2..5}_{i}_branch2{a,b,c}_w and _bn_{s,b}, res{2..5}_0_branch1_w and _bn_{s,b}; the ImageNet classifier
      fc1000_{w,b} (pred_{w,b} in some files) and optimizer `*_momentum` blobs are dropped.
    depth: 50 or 101, the ResNet the blobs belong to (and the config's model.backbone.depth).
    eps: the config's model.backbone.norm_eps; each AffineChannel (x * s + b) becomes a FrozenBN with scale s,
      bias b, mean 0 and var chosen so that FrozenBN computes x * s + b exactly.
    return_extras: also return {"dropped": [keys consumed without conversion]}.

  Returns:
    {"params": {"backbone": ...}, "batch_stats": {"backbone": ...}} of numpy float32 arrays, or (that, extras).
  """
  if depth not in STAGE_BLOCKS:
    raise ValueError(f"{MSRA_SOURCE}: ResNet depth {depth} is not supported; expected one of {sorted(STAGE_BLOCKS)}")
  tb = TreeBuilder(blobs, MSRA_SOURCE)
  dropped = [k for k in tb.state if k in ("fc1000_w", "fc1000_b", "pred_w", "pred_b") or k.endswith("_momentum")]
  for key in dropped:
    tb.ignore(key)
  var = _affine_as_frozen_bn_var(eps)
  branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
  for block, conv, in_ch, out_ch, k in _resnet_convs(depth):
    if block == "stem":
      conv_key, norm_key = "conv1", "res_conv1_bn"
    else:
      conv_key = f"res{block[0]}_{block[1]}_{branch[conv]}"
      norm_key = f"{conv_key}_bn"
    conv_path, norm_path = _backbone_path(block, conv)
    tb.put("params", conv_path + ("kernel",), conv_kernel(_take(tb, f"{conv_key}_w", (out_ch, in_ch, k, k))))
    tb.put("batch_stats", norm_path + ("scale",), _take(tb, f"{norm_key}_s", (out_ch,)))
    tb.put("batch_stats", norm_path + ("bias",), _take(tb, f"{norm_key}_b", (out_ch,)))
    tb.put("batch_stats", norm_path + ("mean",), np.zeros((out_ch,), np.float32))
    tb.put("batch_stats", norm_path + ("var",), np.full((out_ch,), var, np.float32))
  return _finish(tb, sorted(dropped), {}, return_extras)
