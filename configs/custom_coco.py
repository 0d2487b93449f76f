r"""Your own dataset in COCO format: the small from-scratch Mask R-CNN of the main job, fitted to your data.

  python -m mrcnn_jax.main --config=configs/custom_coco.py --workdir=/tmp/mydata \
      --config.dataset.train_json=DATA/annotations/train.json --config.dataset.train_image_dir=DATA/train \
      --config.dataset.val_json=DATA/annotations/val.json --config.dataset.val_image_dir=DATA/val

Before training, the fields below that are left unset (None) are derived from the annotation files and printed
(mrcnn_jax/config_from_data.py has the rules): the number of classes and their names, the ground-truth slots
(input.max_instances), the scale and the canvases from the image sizes, the anchor sizes from the object sizes, and
the schedule from the number of training images (eight epochs, at least 500 steps). Set any of them on the command
line to keep your own value. The checkpoint carries the resolved config, so `python -m mrcnn_jax.predict
--checkpoint=/tmp/mydata --images=DIR --out=OUT` needs no --config and draws your category names.

The model is the shapes recipe (configs/shapes.py): ResNet-18 at half width with BatchNorm, trained from scratch,
sized for a CPU. To fine-tune a pretrained model instead, add --config.init_from=DIR (weights converted with
scripts/convert_weights.py, or another run's workdir): its saved config then supplies the architecture and the input
conventions, and the data still decides the classes, slots, scale, canvases and schedule.

Expected on the example set of README's "Train on your own data" (mrcnn_jax.data.nuclei: 33 training tiles of
128x128 with 3-15 nuclei each, one category with id 7, 4 validation tiles): see README for the figures of a run.
`:runlocal` shrinks the schedule to 20 steps.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mrcnn_jax import config_files

shapes = config_files.load_sibling(__file__, "shapes")

ARGS = ("", "runlocal")

# Fields derived from the dataset when left unset (mrcnn_jax/config_from_data.py), with their types.
DERIVED = {
    "model.num_classes": int, "model.anchors.sizes": tuple, "model.pooler.canonical_size": int,
    "input.max_instances": int, "input.canvases": tuple, "input.min_size_train": tuple, "input.max_size_train": int,
    "input.min_size_test": int, "input.max_size_test": int,
    "train.max_iter": int, "train.steps": tuple, "train.warmup_iters": int, "train.checkpoint_every": int,
    "train.eval_every": int,
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The custom-data config; `arg` "runlocal" gives a run of 20 steps."""
  config = shapes.get_config()
  config.unlock()
  del config.dataset["shapes"]  # no generated set: the paths name the user's data
  config.dataset.name = "custom"
  config.model.class_names = ()  # the dataset's category names
  for path, kind in DERIVED.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    del node[leaf]
    node[leaf] = placeholder(kind)
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; expected one of {ARGS}")
  if arg == "runlocal":
    t = config.train
    t.max_iter, t.steps, t.warmup_iters, t.log_every, t.checkpoint_every, t.eval_every = 20, (15, 18), 2, 5, 10, 20
  config.lock()
  return config
