"""The tiny random-init Mask R-CNN of the inference-side tests (evaluate, predict CLI, export, notebook).

ResNet-18 at a quarter width on a small canvas: it initializes, compiles and runs in seconds on a CPU. It is written
as overrides of the base config, so that a test applies the same values in its own process (`config`) and on a
command line (`flags`).
"""

import pathlib

from mrcnn_jax import config_files

BASE_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "mask_rcnn_R50_FPN_1x.py"

MODEL = {
    "model.num_classes": 3,
    "model.class_names": ("circle", "square", "triangle"),  # the shapes set's (mrcnn_jax.data.shapes.CLASSES)
    "model.backbone.depth": 18,
    "model.backbone.width": 16,
    "model.fpn.channels": 32,
    "model.rpn.pre_nms_topk_test": 50,
    "model.rpn.post_nms_topk_test": 20,
    "model.roi_heads.fc_dim": 32,
    "model.roi_heads.detections_per_image": 10,
    "model.mask_head.conv_dim": 16,
}

# The same model for training tests, on 64 x 64 images (BatchNorm from scratch: FrozenBN would be an identity that
# lets it diverge), with few sampled anchors and RoIs, 8 ground-truth slots, batch 8, a few steps.
TRAIN = {
    **MODEL, "model.backbone.norm": "BN", "model.backbone.freeze_at": 0,
    "model.rpn.batch_size_per_image": 32, "model.rpn.pre_nms_topk_train": 50, "model.rpn.post_nms_topk_train": 20,
    "model.roi_heads.batch_size_per_image": 16,
    "input.canvases": ((64, 64),), "input.min_size_train": (64,), "input.max_size_train": 64, "input.min_size_test": 64,
    "input.max_size_test": 64, "input.max_instances": 8, "input.gt_mask_size": 16,
    "train.batch_size": 8, "train.max_iter": 6, "train.warmup_iters": 0, "train.base_lr": 0.01,
    "train.log_every": 1, "train.checkpoint_every": 3, "train.num_workers": 0,
}

# Inputs of unit scale (the base config's std is 1 on 0..255 pixels), so that random weights give spread-out scores
# and detections at all.
UNIT_PIXEL_STD_KW = {"input__pixel_std": (58.395, 57.12, 57.375)}


def overrides(canvas: int, min_size_test: int, **extra) -> dict:
  """MODEL on a canvas x canvas input, plus `extra` ({"input.pixel_std": ...} given as input__pixel_std=...)."""
  return {**MODEL, "input.canvases": ((canvas, canvas),), "input.min_size_test": min_size_test,
          "input.max_size_test": canvas, **{k.replace("__", "."): v for k, v in extra.items()}}


def config(values: dict):
  """The base config with `values` ({"a.b.c": value}) applied."""
  cfg = config_files.load_config(str(BASE_CONFIG))
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def flags(values: dict) -> list[str]:
  """`values` as the entry points' `--config.a.b=value` flags."""
  return [f"--config.{k}={v}" for k, v in values.items()]
