r"""Mask R-CNN, ResNet-50-FPN, torchvision conventions: the config of torchvision's maskrcnn_resnet50_fpn weights.

The Detectron2 base (mask_rcnn_R50_FPN_1x.py, where every field is documented) with every convention switched to
torchvision's, so that its weights (MaskRCNN_ResNet50_FPN_Weights.COCO_V1) converted to mrcnn_jax give the same
detections as torchvision itself:
- label space: torchvision's 91-way COCO id space (label == COCO category id, 0 background, gaps unused): 90
  foreground classes, background logit first, box deltas for all 91 classes;
- backbone: torchvision ResNet (stride in the 3x3 conv), FrozenBN, layers 2..4 trained (trainable_layers=3);
- input: RGB in 0..1 normalized by the ImageNet mean and std, resized with F.interpolate, short side 800 only;
- anchors: rounded base anchors, strides frame // grid; RPN ranks by sigmoid scores with score_thresh 0.0 and
  drops boxes under 1e-3;
- RoIAlign: not aligned, sampling ratio 2, torchvision's level mapper; detections under 1e-2 dropped;
- losses: smooth L1 with beta 1/9; 2000 proposals per training image (torchvision's rpn_post_nms_top_n_train);
- keypoints (Keypoint R-CNN, which builds on this config): coordinates as COCO annotates them, no 0.5 offset;
- schedule: torchvision's detection recipe (26 epochs, decay at 16 and 22), as iterations.

Evaluate torchvision's weights (maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth):

  python scripts/convert_weights.py --from torchvision maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out /tmp/tv_maskrcnn
  python -m mrcnn_jax.evaluate --config=configs/mask_rcnn_R50_FPN_torchvision.py --checkpoint=/tmp/tv_maskrcnn \
      --config.dataset.val_json=COCO/annotations/instances_val2017.json --config.dataset.val_image_dir=COCO/val2017

Expected on COCO val2017: box AP 37.9, mask AP 34.6 (torchvision's published figures for these weights).

Train with torchvision's recipe (global batch 16; an ImageNet ResNet-50 backbone as init_from):

  python -m mrcnn_jax.main --config=configs/mask_rcnn_R50_FPN_torchvision.py --workdir=/tmp/tv_maskrcnn_train \
      --config.init_from=BACKBONE_DIR \
      --config.dataset.train_json=COCO/annotations/instances_train2017.json \
      --config.dataset.train_image_dir=COCO/train2017 \
      --config.dataset.val_json=COCO/annotations/instances_val2017.json \
      --config.dataset.val_image_dir=COCO/val2017

Quick local run: `--config=configs/mask_rcnn_R50_FPN_torchvision.py:runlocal`.
"""

import ml_collections

from mrcnn_jax import config_files
from mrcnn_jax.data import categories


base = config_files.load_sibling(__file__, "mask_rcnn_R50_FPN_1x")

# torchvision counts its schedule in epochs: 117,266 train2017 images with annotations / batch 16, rounded up.
ITERS_PER_EPOCH = 7330


def get_config(arg=None) -> ml_collections.ConfigDict:
  """torchvision's maskrcnn_resnet50_fpn; `arg` "runlocal" shrinks it for a quick local run."""
  config = base.get_config()
  model = config.model
  model.num_classes = 90  # torchvision's num_classes=91 counts the background
  model.label_space = "coco_ids"
  model.class_names = categories.coco_id_class_names(90)  # label == COCO id: "N/A" in the 10 gaps, as torchvision
  model.loss_convention = "torchvision"
  model.backbone.stride_in_1x1 = False
  model.anchors.convention = "torchvision"
  model.rpn.post_nms_topk_train = 2000
  model.rpn.min_size = 1e-3
  model.rpn.score_thresh = 0.0
  model.rpn.sigmoid_scores = True
  model.rpn.smooth_l1_beta = 1.0 / 9.0
  model.roi_heads.min_box_size_test = 1e-2
  model.roi_heads.smooth_l1_beta = 1.0 / 9.0
  model.pooler.aligned = False
  model.pooler.sampling_ratio = 2
  model.pooler.level_convention = "torchvision"
  model.mask_head.paste_mode = "torchvision"
  model.keypoint_head.coordinate_offset = 0.0  # keypoints as COCO annotates them (Keypoint R-CNN inherits it)

  inp = config.input
  inp.pixel_format = "RGB"
  inp.pixel_scale = 1.0
  inp.pixel_mean = (0.485, 0.456, 0.406)
  inp.pixel_std = (0.229, 0.224, 0.225)
  inp.resize_mode = "torchvision"
  inp.min_size_train = (800,)

  train = config.train
  train.weight_decay_norm = 1e-4  # torchvision's recipe decays every trained parameter alike
  train.weight_decay_bias = 1e-4
  train.max_iter = 26 * ITERS_PER_EPOCH
  train.steps = (16 * ITERS_PER_EPOCH, 22 * ITERS_PER_EPOCH)
  train.checkpoint_every = ITERS_PER_EPOCH  # the recipe checkpoints and evaluates after every epoch
  train.eval_every = ITERS_PER_EPOCH
  return base.finalize(config, arg)
