"""FLOPs of one image through the model counted by hand (`hand_flops`): the convolutions and dense layers of the
config, part by part, the yardstick XLA's own estimate of a compiled program is read against."""

from __future__ import annotations

import collections
import dataclasses


def _out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


@dataclasses.dataclass
class _Counter:
  """Multiply-accumulates of one image, by part, forward and train step (forward + backward)."""

  forward: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
  train: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(float))

  def add(self, part: str, macs: float, *, passes: int) -> None:
    # passes: 3 for a trained layer whose input needs a gradient (forward, d input, d kernel), 2 when its input
    # needs none (a stop-gradient, frozen stage's output), 1 for a frozen layer (forward only).
    self.forward[part] += macs
    self.train[part] += passes * macs

  def conv(self, part: str, hw, k: int, stride: int, pad: int, cin: int, cout: int, *,
           passes: int) -> tuple[int, int]:
    """Counts a k x k convolution from cin to cout channels of an hw = (h, w) input; returns its output's (h, w)."""
    ho, wo = _out(hw[0], k, stride, pad), _out(hw[1], k, stride, pad)
    self.add(part, ho * wo * k * k * cin * cout, passes=passes)
    return ho, wo


def hand_flops(config, canvas_hw, *, train: bool) -> dict:
  """FLOPs of one image through the model, counted by hand: 2 x multiply-accumulates of every convolution and
  dense layer, by part ({"backbone": ..., "fpn": ..., "rpn": ..., "box_head": ..., "mask_head": ...,
  "keypoint_head": ..., "total": ...}).

  A convolution of a k x k kernel from C_in to C_out channels producing an H_o x W_o map is H_o W_o k^2 C_in C_out
  MACs (every output pixel counts k^2 taps, padded ones too); a dense layer D_in -> D_out on R rows is R D_in D_out.
  - backbone + FPN at the canvas: the stem (7x7, stride 2), the residual stages (1x1 / 3x3 / 1x1 bottlenecks, or
    3x3 / 3x3 basic blocks, shortcut 1x1 where the shape changes, the stride where the config puts it), FPN's
    lateral 1x1 and output 3x3 on P2..P5 (P6 is a max-pool: no MACs);
  - RPN head: its 3x3 conv and the two 1x1 predictors on P2..P6;
  - box head: fc1 (res^2 C -> fc_dim), fc2, the class and box predictors, on R RoIs: the sampled
    roi_heads.batch_size_per_image in training, rpn.post_nms_topk_test at inference;
  - mask head: num_convs 3x3 convs at mask_resolution, the 2x2 stride-2 deconvolution (4 taps), the 1x1 predictor
    at twice the resolution (to every class in training, to each detection's own class at inference), on the
    foreground RoIs: all batch_size_per_image x positive_fraction slots in training
    (the largest branch of the foreground switch: the worst case, the one that has to fit), detections_per_image
    at inference; the keypoint head likewise (its 4x4 deconvolution is 16 taps; the 2x bilinear upsampling is
    left out: under 0.1% of the head).
  train=True counts a train step: forward, then for each trained layer the input gradient and the kernel gradient
  (each as many MACs as the forward), i.e. 3x the forward, except the frozen stages (stem and res2 at freeze_at=2:
  forward only, 1x) and the layers that read a frozen stage's output (2x: no input gradient).

  Where XLA's count (`cost_analysis()["flops"]`) differs: XLA also counts every elementwise op (norms, ReLUs,
  residual adds, RoIAlign's weighted sums over its static K samples per bin, the losses, box decoding, NMS' IoU
  tiles, the optimizer update) as one FLOP per element, and counts a convolution's taps only where they hit the
  unpadded input; a while loop's body counts once, not per iteration (XLA does not multiply by the trip count), and
  a conditional counts its most expensive branch. So XLA is higher where a model is thin (small channel counts make
  elementwise work a larger share) and close to this count for R50-FPN, whose convolutions dominate.
  """
  m = config.model
  c = _Counter()
  stage_out = _count_backbone(c, m.backbone, canvas_hw)
  level_hw = _count_fpn(c, int(m.fpn.channels), stage_out)
  _count_rpn(c, m, level_hw)
  _count_roi_heads(c, m, train=train)
  counts = c.train if train else c.forward
  out = {part: 2.0 * macs for part, macs in counts.items()}
  out["total"] = sum(out.values())
  return out


def _count_backbone(c: _Counter, backbone, canvas_hw) -> dict:
  """The stem and the residual stages at the canvas, frozen up to backbone.freeze_at; returns
  {level: (output (h, w), channels, trained)} of res2..res5, what FPN reads."""
  from mrcnn_jax.modeling import resnet

  frozen_at = int(backbone.freeze_at)
  width = int(backbone.width)
  bottleneck = int(backbone.depth) in (50, 101)
  # Stem (stage 1).
  hw = c.conv("backbone", canvas_hw, 7, 2, 3, 3, width, passes=1 if frozen_at >= 1 else 3)
  hw = (_out(hw[0], 3, 2, 1), _out(hw[1], 3, 2, 1))  # max-pool 3x3, stride 2
  cin = width
  stage_out = {}
  for stage, (blocks, base) in enumerate(zip(resnet.STAGE_BLOCKS[int(backbone.depth)], resnet.STAGE_WIDTHS)):
    level = stage + 2
    trained = level > frozen_at
    wd = base * width // 64
    for i in range(blocks):
      stride = 2 if (i == 0 and level > 2) else 1
      # The first block of the first trained stage reads a frozen output: no input gradient there.
      first_passes = (3 if (i > 0 or level - 1 > frozen_at) else 2) if trained else 1
      passes = 3 if trained else 1
      cout = 4 * wd if bottleneck else wd
      if cin != cout or stride != 1:  # the shortcut's 1x1
        c.conv("backbone", hw, 1, stride, 0, cin, cout, passes=first_passes)
      if bottleneck:
        s1, s3 = (stride, 1) if backbone.stride_in_1x1 else (1, stride)
        mid = c.conv("backbone", hw, 1, s1, 0, cin, wd, passes=first_passes)
        mid = c.conv("backbone", mid, 3, s3, 1, wd, wd, passes=passes)
        hw = c.conv("backbone", mid, 1, 1, 0, wd, cout, passes=passes)
      else:
        mid = c.conv("backbone", hw, 3, stride, 1, cin, wd, passes=first_passes)
        hw = c.conv("backbone", mid, 3, 1, 1, wd, wd, passes=passes)
      cin = cout
    stage_out[level] = (hw, cin, trained)
  return stage_out


def _count_fpn(c: _Counter, channels: int, stage_out: dict) -> dict:
  """FPN's lateral 1x1 and output 3x3 on each stage's output (the lateral of a frozen stage has no input gradient);
  returns {level: (h, w)} of P2..P6, P6 the stride-2 max-pool of P5 (no MACs)."""
  level_hw = {}
  for level, (lhw, ch, trained) in stage_out.items():
    c.conv("fpn", lhw, 1, 1, 0, ch, channels, passes=3 if trained else 2)
    c.conv("fpn", lhw, 3, 1, 1, channels, channels, passes=3)
    level_hw[level] = lhw
  top = max(level_hw)
  level_hw[top + 1] = (_out(level_hw[top][0], 1, 2, 0), _out(level_hw[top][1], 1, 2, 0))
  return level_hw


def _count_rpn(c: _Counter, m, level_hw: dict) -> None:
  """The RPN head on each level: its 3x3 conv, the objectness and the box-delta 1x1 predictors."""
  f = int(m.fpn.channels)
  anchors = len(m.anchors.aspect_ratios) * len(m.anchors.sizes[0])
  for level in range(int(m.fpn.min_level), int(m.fpn.max_level) + 1):
    lhw = level_hw[level]
    c.conv("rpn", lhw, 3, 1, 1, f, f, passes=3)
    c.conv("rpn", lhw, 1, 1, 0, f, anchors, passes=3)
    c.conv("rpn", lhw, 1, 1, 0, f, 4 * anchors, passes=3)


def _conv_stack(resolution: int, num_convs: int, cin: int, dim: int) -> tuple[int, int]:
  """MACs per RoI of a head's num_convs padded 3x3 convolutions at `resolution`, cin channels in, dim out of each;
  returns (MACs, the channels of the last one's output)."""
  macs, ch = 0, cin
  for _ in range(num_convs):
    macs += resolution * resolution * 9 * ch * dim
    ch = dim
  return macs, ch


def _count_roi_heads(c: _Counter, m, *, train: bool) -> None:
  """The box head on the RoIs, the mask and keypoint heads (those enabled) on the foreground RoIs."""
  rh, pool, k1 = m.roi_heads, m.pooler, int(m.num_classes) + 1
  f = int(m.fpn.channels)
  rois = int(rh.batch_size_per_image) if train else int(m.rpn.post_nms_topk_test)
  fc = int(rh.fc_dim)
  res = int(pool.box_resolution)
  c.add("box_head", rois * (res * res * f * fc + fc * fc + fc * k1 + fc * 4 * k1), passes=3)

  fg = int(rh.batch_size_per_image * rh.positive_fraction) if train else int(rh.detections_per_image)
  if m.mask_head.enabled:
    r, d = int(pool.mask_resolution), int(m.mask_head.conv_dim)
    macs, ch = _conv_stack(r, int(m.mask_head.num_convs), f, d)
    macs += r * r * ch * 4 * d  # 2x2 stride-2 deconvolution as one matmul of 4 taps
    # The 1x1 predictor: every class's map in training (the loss picks the ground truth's), each detection's own
    # class's map at inference (`MaskHead` given the classes).
    macs += (2 * r) ** 2 * d * (k1 if train else 1)
    c.add("mask_head", fg * macs, passes=3)
  if m.keypoint_head.enabled:
    r, d, kp = int(pool.keypoint_resolution), int(m.keypoint_head.conv_dim), int(m.keypoint_head.num_keypoints)
    macs, ch = _conv_stack(r, int(m.keypoint_head.num_convs), f, d)
    macs += r * r * ch * 16 * kp  # 4x4 stride-2 deconvolution as one matmul of 16 taps
    c.add("keypoint_head", fg * macs, passes=3)
