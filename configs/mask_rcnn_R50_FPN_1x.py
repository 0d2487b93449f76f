r"""Mask R-CNN, ResNet-50-FPN, 1x schedule (90k iterations at batch 16), Detectron2 conventions.

The base config: every field the library reads is here, with what it means. It is Detectron2's
COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x: MSRA ImageNet R-50 weights (BGR pixels in 0..255 minus the mean,
std 1, stride in the first 1x1 conv of each bottleneck, FrozenBN, stem and res2 frozen), aligned RoIAlign with
adaptive sampling, 80 contiguous classes (Detectron2's weights have the background logit last; the converter moves it
first, mrcnn_jax's layout), plain L1 box losses.

Train (global batch 16 over the devices of the mesh; the backbone from the MSRA R-50.pkl converted with
`python scripts/convert_weights.py --from detectron2 R-50.pkl --out BACKBONE_DIR`):

  python -m mrcnn_jax.main --config=configs/mask_rcnn_R50_FPN_1x.py --workdir=/tmp/mask_rcnn_R50_FPN_1x \
      --config.init_from=BACKBONE_DIR \
      --config.dataset.train_json=COCO/annotations/instances_train2017.json \
      --config.dataset.train_image_dir=COCO/train2017 \
      --config.dataset.val_json=COCO/annotations/instances_val2017.json \
      --config.dataset.val_image_dir=COCO/val2017

Evaluate (the same dataset overrides):

  python -m mrcnn_jax.evaluate --config=configs/mask_rcnn_R50_FPN_1x.py --checkpoint=/tmp/mask_rcnn_R50_FPN_1x \
      --config.dataset.val_json=COCO/annotations/instances_val2017.json --config.dataset.val_image_dir=COCO/val2017

Expected on COCO val2017: box AP 38.6, mask AP 35.2 (Detectron2 model zoo, model id 137260431, trained in about
6.5 h on 8 V100 at 0.261 s/iter). Its weights, model_final_a54504.pkl, converted with
`python scripts/convert_weights.py --from detectron2 model_final_a54504.pkl --out DIR`,
should evaluate with this config to the same numbers.

Quick local run (2 images per batch, 20 steps, 512x512 canvas): `--config=configs/mask_rcnn_R50_FPN_1x.py:runlocal`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mrcnn_jax.data import categories

# COCO person keypoints in the dataset's order: nose, then (left, right) eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles. A horizontal flip swaps each left/right pair.
COCO_KEYPOINT_FLIP_MAP = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))

# What `get_config(arg)` accepts after the colon in `--config=FILE.py:arg`.
ARGS = ("", "runlocal")


def get_config(arg=None) -> ml_collections.ConfigDict:
  """Detectron2's mask_rcnn_R_50_FPN_1x; `arg` "runlocal" shrinks it for a quick local run."""
  config = ml_collections.ConfigDict()

  # Fine-tuning: a fresh run (no checkpoint in its workdir yet) starts from these weights: a directory written by
  # scripts/convert_weights.py or save_variables (an ImageNet backbone, a torchvision or Detectron2 model), or a
  # training workdir (its latest checkpoint). Variables whose path and shape match are loaded; the others (e.g. the
  # class-dependent predictors for another number of classes) keep their random init, and the trainer logs which.
  # The optimizer starts afresh; a resumed run ignores it. "": random init.
  config.init_from = ""

  # --- model: what the Flax modules read (mrcnn_jax/modeling/mask_rcnn.py) ---------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.num_classes = 80  # foreground classes K: labels 1..K, 0 is background
  model.label_space = "contiguous"  # labels 1..80 map to COCO category ids through the dataset ("coco_ids": equal)
  # The names of labels 1..K (overlays, predictions.json); () = unknown. The trainer replaces them by its training
  # set's category names (after checking that the set has num_classes categories) before it saves the config with
  # each checkpoint, so that predict and evaluate name what the checkpoint was trained on.
  model.class_names = categories.coco_class_names()
  # Mixed precision: "bfloat16" (GPU, TPU) computes activations in bfloat16; params, optimizer state, norm statistics,
  # losses and the gradient norm stay float32, and checkpoints hold float32 weights (README, Training).
  model.compute_dtype = "float32"
  # Loss normalization and mask targets: "detectron2" (RPN losses / (anchors per image x images), binary mask
  # targets) | "torchvision" (RPN losses / sampled anchors, soft mask targets). See modeling/losses.py.
  model.loss_convention = "detectron2"
  # Each image is computed inside its frame: its resized size rounded up to this (torchvision's and Detectron2's
  # padding for an FPN backbone), so that its results do not depend on the canvas (mrcnn_jax/ops/frames.py).
  model.size_divisibility = 32

  model.backbone = ml_collections.ConfigDict()
  model.backbone.depth = 50  # 50 | 101 (bottlenecks); 18 | 34 (basic blocks, for small models)
  model.backbone.width = 64  # channels of the stem; every stage scales with it (64: the standard ResNets)
  model.backbone.norm = "FrozenBN"  # "FrozenBN" | "BN" | "GN"
  model.backbone.norm_eps = 1e-5
  model.backbone.stride_in_1x1 = True  # MSRA weights stride in the first 1x1 conv; torchvision's in the 3x3
  model.backbone.freeze_at = 2  # stem and res2 frozen (torchvision's trainable_layers=3)

  model.fpn = ml_collections.ConfigDict()
  model.fpn.channels = 256
  model.fpn.min_level = 2  # P2..P6; P6 is a stride-2 max-pool of P5
  model.fpn.max_level = 6

  model.anchors = ml_collections.ConfigDict()
  model.anchors.sizes = ((32,), (64,), (128,), (256,), (512,))  # one tuple per level, P2..P6
  model.anchors.aspect_ratios = (0.5, 1.0, 2.0)  # height / width
  model.anchors.offset = 0.0  # anchor centers at (i + offset) * stride
  model.anchors.convention = "detectron2"  # "detectron2" (exact sizes) | "torchvision" (rounded base anchors)

  model.rpn = ml_collections.ConfigDict()
  model.rpn.pre_nms_topk_train = 2000  # per level
  model.rpn.post_nms_topk_train = 1000  # per image
  model.rpn.pre_nms_topk_test = 1000
  model.rpn.post_nms_topk_test = 1000
  model.rpn.nms_thresh = 0.7
  model.rpn.min_size = 0.0  # proposals narrower or lower are dropped; 0 keeps the non-empty ones (w > 0, h > 0)
  model.rpn.score_thresh = placeholder(float)  # on sigmoid scores; None: no threshold (Detectron2)
  # Rank proposals by sigmoid probabilities (torchvision: saturated logits tie) rather than by logits (Detectron2).
  model.rpn.sigmoid_scores = False
  model.rpn.box_weights = (1.0, 1.0, 1.0, 1.0)
  model.rpn.iou_thresholds = (0.3, 0.7)  # anchor matching: IoU < 0.3 negative, in between ignored, >= 0.7 positive
  model.rpn.iou_labels = (0, -1, 1)
  model.rpn.batch_size_per_image = 256  # sampled anchors
  model.rpn.positive_fraction = 0.5
  model.rpn.loss_type = "smooth_l1"  # "smooth_l1" | "l1"
  model.rpn.smooth_l1_beta = 0.0  # 0 makes smooth L1 plain L1

  model.roi_heads = ml_collections.ConfigDict()
  model.roi_heads.batch_size_per_image = 512  # sampled RoIs
  model.roi_heads.positive_fraction = 0.25
  # Training runs the mask/keypoint heads on the smallest of these slot counts per image that holds every image's
  # foreground RoIs (else on all batch_size_per_image * positive_fraction = 128). Same losses, less work; () turns it
  # off (one static size, one program branch).
  model.roi_heads.foreground_buckets = (8, 16, 32, 64)
  model.roi_heads.iou_threshold = 0.5  # foreground at IoU >= 0.5
  model.roi_heads.proposal_append_gt = True
  model.roi_heads.score_thresh_test = 0.05
  model.roi_heads.nms_thresh_test = 0.5  # class-wise
  model.roi_heads.detections_per_image = 100
  model.roi_heads.min_box_size_test = 0.0  # detections narrower or lower are dropped; 0 keeps all
  model.roi_heads.box_weights = (10.0, 10.0, 5.0, 5.0)
  model.roi_heads.fc_dim = 1024
  model.roi_heads.smooth_l1_beta = 0.0

  model.pooler = ml_collections.ConfigDict()
  model.pooler.aligned = True  # RoIAlignV2: half-pixel offset
  model.pooler.max_level = 5  # RoIs pool from P2..P5 (P6 feeds only the RPN)
  model.pooler.sampling_ratio = 0  # 0: adaptive, ceil(RoI size / output size) samples per bin and axis ...
  # ... up to a static bound. None derives it from the canvases: what the largest RoI of the top level needs on the
  # largest canvas (6 for 7x7 bins, 3 for 14x14 on 1344 px; `mask_rcnn.sampling_bound`); a number overrides it.
  model.pooler.max_sampling_ratio = placeholder(int)
  model.pooler.canonical_size = 224  # an RoI of sqrt(area) 224 goes to level 4
  model.pooler.canonical_level = 4
  model.pooler.level_convention = "detectron2"  # "detectron2" | "torchvision" (its eps in the level formula)
  model.pooler.box_resolution = 7
  model.pooler.mask_resolution = 14
  model.pooler.keypoint_resolution = 14
  model.pooler.impl = placeholder(str)  # None: the backend's default; "xla" | "pallas"

  model.mask_head = ml_collections.ConfigDict()
  model.mask_head.enabled = True
  model.mask_head.num_convs = 4
  model.mask_head.conv_dim = 256
  model.mask_head.paste_mode = "detectron2"  # how 28x28 masks are pasted into the image: "detectron2" | "torchvision"
  model.mask_head.mask_threshold = 0.5

  model.keypoint_head = ml_collections.ConfigDict()
  model.keypoint_head.enabled = False
  model.keypoint_head.num_keypoints = 17
  model.keypoint_head.num_convs = 8
  model.keypoint_head.conv_dim = 512
  # With the keypoint head on, training images whose instances have fewer visible keypoints (visibility > 0) than
  # this in all are skipped (Detectron2's MIN_KEYPOINTS_PER_IMAGE; torchvision's reference uses 10); 0 keeps all.
  model.keypoint_head.min_visible_per_image = 1
  # Where keypoint coordinates put a pixel's centre. COCO's keypoint annotations are integer pixel indices;
  # Detectron2's load_coco_json adds 0.5 to every keypoint x and y as it loads them (pixel centres at +0.5, as box
  # coordinates have them) and its instances_to_coco_json subtracts it when it writes results; torchvision uses the
  # annotations as they are (0.0). Training adds it to the x and y of each example's labeled keypoints
  # (data/examples.py) and evaluation subtracts it from the predicted ones (predictor.to_coco_results), so that a
  # model trained here follows the convention of its config's framework exactly, as that framework's weights do.
  model.keypoint_head.coordinate_offset = 0.5

  # --- input: decoding, resizing, normalizing and padding (host side) -----------------------------------------------
  config.input = inp = ml_collections.ConfigDict()
  inp.pixel_format = "BGR"  # channel order the weights expect: "BGR" | "RGB"
  inp.pixel_scale = 255.0  # pixels in 0..pixel_scale before the mean is subtracted
  inp.pixel_mean = (103.53, 116.28, 123.675)  # in pixel_format order
  inp.pixel_std = (1.0, 1.0, 1.0)
  inp.resize_mode = "detectron2"  # "detectron2" (PIL bilinear on uint8) | "torchvision" (F.interpolate bilinear)
  inp.min_size_train = (640, 672, 704, 736, 768, 800)  # short side, one drawn per image
  inp.max_size_train = 1333  # long side cap
  inp.min_size_test = 800
  inp.max_size_test = 1333
  # The static canvases images are padded to (one compiled program each), multiples of model.size_divisibility.
  # Each image goes to the smallest that holds it (data/transforms.py, choose_canvas): 4:3 and squarer images
  # (COCO's most common, 640x480 -> 800x1067) to 800x1088, wider ones to 800x1344, portraits likewise.
  inp.canvases = ((800, 1088), (1088, 800), (800, 1344), (1344, 800))
  inp.keypoint_flip_map = COCO_KEYPOINT_FLIP_MAP
  inp.max_instances = 100  # G: ground-truth slots per image
  inp.gt_mask_size = 112  # M: each instance's mask cropped to its box, resized to M x M

  # --- dataset ------------------------------------------------------------------------------------------------------
  config.dataset = data = ml_collections.ConfigDict()
  data.name = "coco_2017"
  data.train_json = placeholder(str)  # COCO/annotations/instances_train2017.json
  data.train_image_dir = placeholder(str)  # COCO/train2017
  data.val_json = placeholder(str)  # COCO/annotations/instances_val2017.json
  data.val_image_dir = placeholder(str)  # COCO/val2017
  # A prepared tfds `coco_instances` set (mrcnn_jax/data/tfds_coco.py, read without TensorFlow): when set, training
  # reads its split train_split and evaluation val_split (with builder config tfds_config) instead of the JSON files.
  data.tfds_data_dir = placeholder(str)
  data.tfds_config = "instances"  # "instances" | "person_keypoints"
  data.train_split = "train2017"  # "train" for a shapes set
  data.val_split = "val2017"  # "val" for a shapes set
  data.filter_empty_annotations = True  # skip training images without usable annotations, as Detectron2 does

  # --- train: SGD with momentum, linear warmup, step decay (Detectron2's SOLVER) ----------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 16  # global, over all devices
  train.base_lr = 0.02  # at batch_size 16; scale linearly with it
  train.momentum = 0.9
  train.weight_decay = 1e-4
  train.weight_decay_norm = 0.0  # on normalization scales and offsets
  # On the biases of convolutions and dense layers. Detectron2's SOLVER.WEIGHT_DECAY_BIAS defaults to WEIGHT_DECAY;
  # here biases are not decayed unless asked.
  train.weight_decay_bias = 0.0
  train.clip_grad_norm = placeholder(float)  # global L2 norm the gradients are clipped to; None: no clipping
  train.max_iter = 90000
  train.steps = (60000, 80000)  # the learning rate is multiplied by gamma at each
  train.gamma = 0.1
  train.warmup_iters = 1000  # linear from base_lr * warmup_factor to base_lr
  train.warmup_factor = 0.001
  train.seed = 0  # model init and, folded with the step, every training step's sampling
  # A step whose total loss or gradient is not finite: True skips its update and counts it (metrics
  # nonfinite_skipped); False applies it and the trainer stops the run, leaving the last good checkpoint.
  train.skip_nonfinite = False
  # With skip_nonfinite, the run still stops (naming the step) at this many non-finite steps in a row: a run that
  # diverged would otherwise skip every later step.
  train.max_consecutive_nonfinite = 10
  train.log_every = 20
  train.checkpoint_every = 5000
  train.keep_checkpoints = 3  # the last N checkpoints are kept
  train.num_workers = 2  # input pipeline worker processes per host (0: in the training process)
  train.eval_every = 90000  # Detectron2 evaluates once, after the last step

  return finalize(config, arg)


def finalize(config: ml_collections.ConfigDict, arg=None) -> ml_collections.ConfigDict:
  """Applies `arg` ("runlocal" shrinks the run) and locks `config`; every config file ends with it."""
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; expected one of {ARGS}")
  if arg == "runlocal":
    train = config.train
    train.base_lr = train.base_lr * 2 / train.batch_size  # keep the learning rate per image
    train.batch_size = 2
    train.max_iter = 20
    train.steps = (14, 18)
    train.warmup_iters = 5
    train.log_every = 1
    train.checkpoint_every = 10
    train.eval_every = 20
    inp = config.input
    inp.min_size_train = (320,)
    inp.max_size_train = 512
    inp.min_size_test = 320
    inp.max_size_test = 512
    inp.canvases = ((512, 512),)
  config.lock()
  return config
