r"""Keypoint R-CNN, ResNet-50-FPN, torchvision conventions: the config of torchvision's keypointrcnn_resnet50_fpn.

torchvision's Mask R-CNN config (mask_rcnn_R50_FPN_torchvision.py, which lists its conventions) turned into
torchvision's Keypoint R-CNN, so that its weights (KeypointRCNN_ResNet50_FPN_Weights.COCO_V1) converted to mrcnn_jax
give the same detections as torchvision itself: torchvision's default num_classes=2 (background and person, label 1 ==
COCO's person id), the keypoint head (17 COCO keypoints) in place of the mask head, training short sides 640..800
(KeypointRCNN's default), training images with fewer than 10 visible keypoints skipped
(model.keypoint_head.min_visible_per_image = 10: torchvision's reference recipe, min_keypoints_per_image), and its
schedule (46 epochs, decay at 36 and 43).

Evaluate torchvision's weights (keypointrcnn_resnet50_fpn_coco-fc266e95.pth):

  python scripts/convert_weights.py --from torchvision keypointrcnn_resnet50_fpn_coco-fc266e95.pth \
      --out /tmp/tv_keypointrcnn
  python -m mrcnn_jax.evaluate --config=configs/keypoint_rcnn_R50_FPN_torchvision.py \
      --checkpoint=/tmp/tv_keypointrcnn \
      --config.dataset.val_json=COCO/annotations/person_keypoints_val2017.json \
      --config.dataset.val_image_dir=COCO/val2017

Expected on COCO val2017 (person): box AP 54.6, keypoint AP 65.0 (torchvision's published figures for these weights).

Train with torchvision's recipe (global batch 16; an ImageNet ResNet-50 backbone as init_from):

  python -m mrcnn_jax.main --config=configs/keypoint_rcnn_R50_FPN_torchvision.py --workdir=/tmp/tv_kprcnn_train \
      --config.init_from=BACKBONE_DIR \
      --config.dataset.train_json=COCO/annotations/person_keypoints_train2017.json \
      --config.dataset.train_image_dir=COCO/train2017 \
      --config.dataset.val_json=COCO/annotations/person_keypoints_val2017.json \
      --config.dataset.val_image_dir=COCO/val2017

Quick local run: `--config=configs/keypoint_rcnn_R50_FPN_torchvision.py:runlocal`.
"""

import ml_collections

from mrcnn_jax import config_files


base = config_files.load_sibling(__file__, "mask_rcnn_R50_FPN_1x")
tv_mask = config_files.load_sibling(__file__, "mask_rcnn_R50_FPN_torchvision")

# An estimate: of the 64,115 train2017 images that hold a person, the >= 10 visible keypoints filter keeps roughly
# 56k; at batch 16 that is about 3,500 iterations per epoch.
ITERS_PER_EPOCH = 3500


def get_config(arg=None) -> ml_collections.ConfigDict:
  """torchvision's keypointrcnn_resnet50_fpn; `arg` "runlocal" shrinks it for a quick local run."""
  config = tv_mask.get_config()
  model = config.model
  model.num_classes = 1  # person; torchvision's num_classes=2 counts the background
  model.class_names = ("person",)  # label 1 is COCO's category id 1
  model.mask_head.enabled = False
  model.keypoint_head.enabled = True
  model.keypoint_head.min_visible_per_image = 10

  config.input.min_size_train = (640, 672, 704, 736, 768, 800)

  train = config.train
  train.max_iter = 46 * ITERS_PER_EPOCH
  train.steps = (36 * ITERS_PER_EPOCH, 43 * ITERS_PER_EPOCH)
  train.checkpoint_every = ITERS_PER_EPOCH
  train.eval_every = ITERS_PER_EPOCH
  return base.finalize(config, arg)
