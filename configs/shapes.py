r"""The main job: a small Mask R-CNN trained from scratch on the built-in synthetic shapes set, sized for a 2-core CPU.

  python -m mrcnn_jax.main --config=configs/shapes.py --workdir=/tmp/shapes

generates the set under `<workdir>/shapes_data` (or `dataset.shapes.dir`) unless it is already there, trains, evaluates
on the held-out val split (COCO box and mask AP), saves the checkpoint and writes `<workdir>/predictions.png`.

The set is the config's own data: dataset.train_json, val_json and the other dataset paths are refused here (the
job would otherwise train on the shapes anyway); for your own COCO-format data use configs/custom_coco.py.

The model: ResNet-18 at half width with BatchNorm (trained from scratch, so no frozen statistics), a 64-channel FPN,
RPN and heads shrunk to the task (3 classes, at most 8 instances per 128x128 image).
`:runlocal` shrinks it to a smoke run of a few steps.

Expected on the held-out shapes val split (100 images): bbox AP 76.9, segm AP 73.3 (measured 2026-12-07: 1,000
steps of batch 8; on the 2-core CPU development machine 0.49-0.55 s per step and 10.5 min for the whole job
including the install on 2026-11-24, 0.9 s per step and 18.5 min on the slower day of the AP figures;
deterministic on a given machine and build).
"""

import ml_collections

from mrcnn_jax import config_files

base = config_files.load_sibling(__file__, "mask_rcnn_R50_FPN_1x")

ARGS = ("", "runlocal")


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The shapes config; `arg` "runlocal" gives a run of a few steps."""
  config = base.get_config()
  config.unlock()  # to add dataset.shapes
  m = config.model
  m.num_classes = 3
  m.class_names = ("circle", "square", "triangle")  # mrcnn_jax.data.shapes.CLASSES
  m.backbone.depth = 18
  m.backbone.width = 32
  m.backbone.norm = "BN"  # from scratch: statistics must be learned
  m.backbone.freeze_at = 0
  m.backbone.stride_in_1x1 = False
  m.fpn.channels = 64
  # Shapes are 16-48 px on a 128 px canvas: anchors half the COCO sizes.
  m.anchors.sizes = ((16,), (32,), (64,), (128,), (256,))
  m.rpn.pre_nms_topk_train = 256
  m.rpn.post_nms_topk_train = 128
  m.rpn.pre_nms_topk_test = 256
  m.rpn.post_nms_topk_test = 64
  m.rpn.batch_size_per_image = 128
  m.roi_heads.batch_size_per_image = 64
  m.roi_heads.detections_per_image = 20
  m.roi_heads.fc_dim = 256
  m.pooler.canonical_size = 64  # a 64 px RoI pools from P4: the shapes spread over P2..P4
  m.pooler.max_sampling_ratio = 2
  m.mask_head.num_convs = 2
  m.mask_head.conv_dim = 64

  inp = config.input
  inp.pixel_format = "RGB"
  inp.pixel_scale = 255.0
  inp.pixel_mean = (123.675, 116.28, 103.53)
  inp.pixel_std = (58.395, 57.12, 57.375)
  inp.min_size_train = (128,)
  inp.max_size_train = 128
  inp.min_size_test = 128
  inp.max_size_test = 128
  inp.canvases = ((128, 128),)
  inp.max_instances = 8
  inp.gt_mask_size = 56

  data = config.dataset
  data.name = "shapes"
  data.shapes = ml_collections.ConfigDict()
  data.shapes.dir = ""  # "" = <workdir>/shapes_data
  data.shapes.num_train = 1000
  data.shapes.num_val = 100
  data.shapes.seed = 0
  data.shapes.image_size = 128

  t = config.train
  t.batch_size = 8
  t.base_lr = 0.02
  t.max_iter = 1000
  t.steps = (750, 920)
  t.warmup_iters = 100
  t.log_every = 50
  t.checkpoint_every = 500
  t.eval_every = 500
  t.num_workers = 1
  return finalize(config, arg)


def finalize(config, arg=None):
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; expected one of {ARGS}")
  if arg == "runlocal":
    t = config.train
    t.max_iter, t.steps, t.warmup_iters, t.log_every, t.checkpoint_every, t.eval_every = 10, (8, 9), 2, 1, 5, 10
    config.dataset.shapes.num_train = 32
    config.dataset.shapes.num_val = 8
  config.lock()
  return config
