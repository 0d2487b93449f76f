"""Experiment configs: one `get_config(arg=None) -> ml_collections.ConfigDict` per file.

Each file is loaded by path with `--config=configs/FILE.py` (ml_collections.config_flags), and fields are overridden
on the command line with `--config.a.b=value`; the returned configs are locked, so a misspelt field fails. A variant
loads its base from this folder by file path (not by package import), so it works both as `configs.FILE` and when
loaded by path. `get_config("runlocal")` shrinks the schedule and the canvas for a quick local run.

  shapes.py                             the main job: a small Mask R-CNN on the synthetic shapes set, for a CPU
  custom_coco.py                        your own COCO-format set: the shapes recipe, fields derived from the data
  mask_rcnn_R50_FPN_1x.py               the base: Detectron2 conventions, every field documented
  mask_rcnn_R50_FPN_3x.py               the base with the 3x schedule
  mask_rcnn_R101_FPN_3x.py              ResNet-101, 3x schedule
  keypoint_rcnn_R50_FPN_1x.py           Keypoint R-CNN (person keypoints), Detectron2 conventions
  mask_rcnn_R50_FPN_torchvision.py      torchvision's maskrcnn_resnet50_fpn conventions (for its converted weights)
  keypoint_rcnn_R50_FPN_torchvision.py  torchvision's keypointrcnn_resnet50_fpn conventions
"""
