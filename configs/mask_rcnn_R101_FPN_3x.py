r"""Mask R-CNN, ResNet-101-FPN, 3x schedule (270k iterations at batch 16), Detectron2 conventions.

Detectron2's COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x: the R50 3x config (mask_rcnn_R50_FPN_3x.py) with a
101-layer backbone, initialized from the MSRA R-101 ImageNet weights; nothing else changes.

Train (global batch 16; the backbone converted with
`python scripts/convert_weights.py --from detectron2 R-101.pkl --out BACKBONE_DIR`):

  python -m mrcnn_jax.main --config=configs/mask_rcnn_R101_FPN_3x.py --workdir=/tmp/mask_rcnn_R101_FPN_3x \
      --config.train.init_checkpoint=BACKBONE_DIR \
      --config.dataset.train_json=COCO/annotations/instances_train2017.json \
      --config.dataset.train_image_dir=COCO/train2017 \
      --config.dataset.val_json=COCO/annotations/instances_val2017.json \
      --config.dataset.val_image_dir=COCO/val2017

Evaluate:

  python -m mrcnn_jax.evaluate --config=configs/mask_rcnn_R101_FPN_3x.py --checkpoint=/tmp/mask_rcnn_R101_FPN_3x \
      --config.dataset.val_json=COCO/annotations/instances_val2017.json --config.dataset.val_image_dir=COCO/val2017

Expected on COCO val2017: box AP 42.9, mask AP 38.6 (Detectron2 model zoo, model id 138205316, trained in about
25.5 h on 8 V100 at 0.340 s/iter). Its weights, model_final_a3ec72.pkl, converted with
`python scripts/convert_weights.py --from detectron2 model_final_a3ec72.pkl --out DIR`,
should evaluate with this config to the same numbers.

Quick local run: `--config=configs/mask_rcnn_R101_FPN_3x.py:runlocal`.
"""

import importlib.util
import os

import ml_collections


def _load_sibling(name):
  """configs/<name>.py as a module, by file path: works whether this file was imported or loaded by path."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
  spec = importlib.util.spec_from_file_location(f"_mrcnn_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


base = _load_sibling("mask_rcnn_R50_FPN_1x")
base_3x = _load_sibling("mask_rcnn_R50_FPN_3x")


def get_config(arg=None) -> ml_collections.ConfigDict:
  """Detectron2's mask_rcnn_R_101_FPN_3x; `arg` "runlocal" shrinks it for a quick local run."""
  config = base_3x.get_config()
  config.model.backbone.depth = 101
  return base.finalize(config, arg)
