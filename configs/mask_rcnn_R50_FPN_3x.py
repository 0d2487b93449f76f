r"""Mask R-CNN, ResNet-50-FPN, 3x schedule (270k iterations at batch 16), Detectron2 conventions.

Detectron2's COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x: the 1x base (mask_rcnn_R50_FPN_1x.py, where every
field is documented) with a schedule three times as long; nothing else changes.

Train (global batch 16; the MSRA R-50 backbone converted with
`python scripts/convert_weights.py --from detectron2 R-50.pkl --out BACKBONE_DIR`):

  python -m mrcnn_jax.main --config=configs/mask_rcnn_R50_FPN_3x.py --workdir=/tmp/mask_rcnn_R50_FPN_3x \
      --config.init_from=BACKBONE_DIR \
      --config.dataset.train_json=COCO/annotations/instances_train2017.json \
      --config.dataset.train_image_dir=COCO/train2017 \
      --config.dataset.val_json=COCO/annotations/instances_val2017.json \
      --config.dataset.val_image_dir=COCO/val2017

Evaluate:

  python -m mrcnn_jax.evaluate --config=configs/mask_rcnn_R50_FPN_3x.py --checkpoint=/tmp/mask_rcnn_R50_FPN_3x \
      --config.dataset.val_json=COCO/annotations/instances_val2017.json --config.dataset.val_image_dir=COCO/val2017

Expected on COCO val2017: box AP 41.0, mask AP 37.2 (Detectron2 model zoo, model id 137849600, trained in about
19.6 h on 8 V100 at 0.261 s/iter). Its weights, model_final_f10217.pkl, converted with
`python scripts/convert_weights.py --from detectron2 model_final_f10217.pkl --out DIR`,
should evaluate with this config to the same numbers.

Quick local run: `--config=configs/mask_rcnn_R50_FPN_3x.py:runlocal`.
"""

import ml_collections

from mrcnn_jax import config_files


base = config_files.load_sibling(__file__, "mask_rcnn_R50_FPN_1x")


def get_config(arg=None) -> ml_collections.ConfigDict:
  """Detectron2's mask_rcnn_R_50_FPN_3x; `arg` "runlocal" shrinks it for a quick local run."""
  config = base.get_config()
  config.train.max_iter = 270000
  config.train.steps = (210000, 250000)
  config.train.eval_every = 270000
  return base.finalize(config, arg)
