r"""Keypoint R-CNN, ResNet-50-FPN, 1x schedule (90k iterations at batch 16), Detectron2 conventions.

Detectron2's COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x: the Mask R-CNN base (mask_rcnn_R50_FPN_1x.py, where every
field is documented) with one foreground class (person), the keypoint head (17 COCO keypoints, 56x56 heatmaps over
14x14 RoIAlign) in place of the mask head, 1500 RPN proposals per training image, and smooth L1 beta 0.5 for the box
regression (Detectron2: keypoint AP drops with plain L1, though box AP rises). Training images with no visible
keypoint are skipped (model.keypoint_head.min_visible_per_image = 1 from the base: Detectron2's
MIN_KEYPOINTS_PER_IMAGE).

Train (global batch 16; the MSRA R-50 backbone converted with
`python scripts/convert_weights.py --from detectron2 R-50.pkl --out BACKBONE_DIR`):

  python -m mrcnn_jax.main --config=configs/keypoint_rcnn_R50_FPN_1x.py --workdir=/tmp/keypoint_rcnn_R50_FPN_1x \
      --config.init_from=BACKBONE_DIR \
      --config.dataset.train_json=COCO/annotations/person_keypoints_train2017.json \
      --config.dataset.train_image_dir=COCO/train2017 \
      --config.dataset.val_json=COCO/annotations/person_keypoints_val2017.json \
      --config.dataset.val_image_dir=COCO/val2017

Evaluate:

  python -m mrcnn_jax.evaluate --config=configs/keypoint_rcnn_R50_FPN_1x.py \
      --checkpoint=/tmp/keypoint_rcnn_R50_FPN_1x \
      --config.dataset.val_json=COCO/annotations/person_keypoints_val2017.json \
      --config.dataset.val_image_dir=COCO/val2017

Expected on COCO val2017 (person): keypoint AP 64.0, box AP 53.6 (Detectron2 model zoo, model id 137261548, trained
in about 7.9 h on 8 V100 at 0.315 s/iter). Its weights, model_final_04e291.pkl, converted with
`python scripts/convert_weights.py --from detectron2 model_final_04e291.pkl --out DIR`,
should evaluate with this config to the same numbers.

Quick local run: `--config=configs/keypoint_rcnn_R50_FPN_1x.py:runlocal`.
"""

import ml_collections

from mrcnn_jax import config_files


base = config_files.load_sibling(__file__, "mask_rcnn_R50_FPN_1x")


def get_config(arg=None) -> ml_collections.ConfigDict:
  """Detectron2's keypoint_rcnn_R_50_FPN_1x; `arg` "runlocal" shrinks it for a quick local run."""
  config = base.get_config()
  model = config.model
  model.num_classes = 1  # person
  model.class_names = ("person",)
  model.rpn.post_nms_topk_train = 1500  # Detectron2: 1000 per image hurts box AP here
  model.roi_heads.smooth_l1_beta = 0.5
  model.mask_head.enabled = False
  model.keypoint_head.enabled = True
  return base.finalize(config, arg)
