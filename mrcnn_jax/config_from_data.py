"""Configs that follow the data: the fields a config leaves unset (None), derived from its COCO annotation files.

`configs/custom_coco.py` leaves unset what depends on a user's dataset; `derive(config)` fills them in before training
starts, from `dataset.train_json` (and `dataset.val_json`), and returns one line per choice for the log. A field the
user set (on the command line or in a config) is kept as it is. The rules:

  model.num_classes, model.class_names   the annotation file's categories (in increasing id order)
  input.max_instances                    the largest number of instances in one training image
  input.min_size_* / max_size_*          the images' median short side, at most 512 px (images keep their size when
                                         they are smaller); the longest side that gives, at most 1333 px
  input.canvases                         the frames of the largest landscape and the largest portrait image at that
                                         scale (one canvas when they agree)
  model.anchors.sizes                    five octaves from the 10th percentile of the objects' sizes (sqrt of the
                                         box area, at the training scale), rounded to a power of two in [8, 128];
  model.pooler.canonical_size            four times the smallest anchor (the shapes recipe: 16 px anchors, 64)
  train.max_iter, steps, warmup_iters,   eight epochs at the config's batch size, at least 500 and at most 20,000
  checkpoint_every, eval_every           steps; the learning rate steps at 75% and 92%, warmup 10% (at most 100)

Fine-tuning (`init_from` names converted weights or another run's workdir, whose saved config describes the model):
the model's architecture and input conventions come from that config instead (the weights only work with them);
only the classes, the instance slots, the scale and canvases and the schedule follow the data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

# The largest short side a derived scale uses: a CPU trains the from-scratch recipe in minutes at this size.
MAX_SHORT_SIDE = 512
MAX_LONG_SIDE = 1333
EPOCHS = 8
MIN_ITERS, MAX_ITERS = 500, 20000
# Model fields of a fine-tuning source that the data does not decide (everything but these is taken).
_DATA_MODEL_FIELDS = ("num_classes", "class_names")
_INPUT_CONVENTIONS = ("pixel_format", "pixel_scale", "pixel_mean", "pixel_std", "resize_mode")


@dataclasses.dataclass(frozen=True)
class DataSummary:
  """What an annotation file says about its dataset: categories (id, name) in id order, each image's (h, w) and
  instance count, and each non-crowd box's side (sqrt of its area), original pixels."""

  path: str
  categories: tuple[tuple[int, str], ...]
  sizes: tuple[tuple[int, int], ...]
  instances: tuple[int, ...]
  box_sides: tuple[float, ...]


def summarize(annotation_file) -> DataSummary:
  """Read a COCO annotation file's categories, image sizes, instances per image and box sizes (no image is read).

  Raises ValueError naming the file when it is not COCO JSON with images and categories.
  """
  path = pathlib.Path(annotation_file)
  try:
    data = json.loads(path.read_text())
    categories = sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in data["categories"])
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in data["images"]}
    counts = dict.fromkeys(sizes, 0)
    sides = []
    for ann in data.get("annotations", []):
      if int(ann["image_id"]) in counts:
        counts[int(ann["image_id"])] += 1
        w, h = float(ann["bbox"][2]), float(ann["bbox"][3])
        if not ann.get("iscrowd") and w > 0 and h > 0:
          sides.append(math.sqrt(w * h))
  except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
    raise ValueError(f"{path}: cannot read the dataset's categories and images ({type(e).__name__}: {e})") from e
  if not sizes or not categories:
    raise ValueError(f"{path}: no images or no categories; is it a COCO instances file?")
  ids = sorted(sizes)
  return DataSummary(str(path), tuple(categories), tuple(sizes[i] for i in ids), tuple(counts[i] for i in ids),
                     tuple(sides))


def _unset(node, key) -> bool:
  return node.get(key) is None


def _scale(summary: DataSummary) -> tuple[int, int]:
  """(short side, long side cap) of the derived resize."""
  shorts = [min(hw) for hw in summary.sizes]
  short = int(min(MAX_SHORT_SIDE, np.median(shorts)))
  longest = max(math.ceil(max(hw) * short / min(hw)) for hw in summary.sizes)
  return short, int(min(MAX_LONG_SIDE, longest))


def _canvases(sizes, input_cfg, d: int) -> tuple[tuple[int, int], ...]:
  """The frames of the largest landscape (h <= w) and portrait image of `sizes` at the config's test and largest
  train scale."""
  from mrcnn_jax.data import transforms  # pylint: disable=import-outside-toplevel

  frames = {True: [0, 0], False: [0, 0]}
  for h, w in sizes:
    for short, cap in ((input_cfg.min_size_test, input_cfg.max_size_test),
                       (max(input_cfg.min_size_train), input_cfg.max_size_train)):
      rh, rw = transforms.output_size(h, w, int(short), int(cap), input_cfg.resize_mode)
      frame = frames[h <= w]
      frame[0], frame[1] = max(frame[0], -(-rh // d) * d), max(frame[1], -(-rw // d) * d)
  out = [tuple(f) for f in (frames[True], frames[False]) if f[0]]
  return tuple(dict.fromkeys(out))


def _fine_tuning_source(config) -> dict | None:
  if not config.get("init_from"):
    return None
  from mrcnn_jax import checkpoint  # pylint: disable=import-outside-toplevel

  saved = checkpoint.load_saved_config(config.init_from)
  if not saved or not isinstance(saved.get("model"), dict):
    raise ValueError(f"init_from={config.init_from} carries no config to take the model from; give a config of "
                     "its architecture (e.g. configs/mask_rcnn_R50_FPN_torchvision.py) instead of custom_coco.py")
  return saved


def _take_model_from(config, saved: dict) -> list[str]:
  """Set config.model (but the data's fields) and the input conventions from a fine-tuning source's saved config."""
  from mrcnn_jax import checkpoint  # pylint: disable=import-outside-toplevel

  source = checkpoint.config_from_saved(saved)
  for key in config.model.keys():
    if key not in _DATA_MODEL_FIELDS and key in source.model:
      config.model[key] = source.model[key]
  for key in _INPUT_CONVENTIONS:
    if key in source.input:
      config.input[key] = source.input[key]
  return [f"model and input conventions from init_from={config.init_from}: ResNet-{source.model.backbone.depth}, "
          f"{source.model.backbone.norm}, {source.input.pixel_format} pixels, {source.input.resize_mode} resize"]


def derive(config) -> list[str]:
  """Fill the unset (None) fields of `config` from its dataset (see the module docstring); returns what was chosen,
  one line per field group. A config with nothing unset is left alone. Raises ValueError naming the field when a
  field is unset and there is no dataset.train_json to derive it from."""
  m, inp, t = config.model, config.input, config.train
  wanted = [("model", k) for k in ("num_classes",) if _unset(m, k)]
  wanted += [("input", k) for k in ("max_instances", "canvases", "min_size_train", "max_size_train", "min_size_test",
                                    "max_size_test") if _unset(inp, k)]
  wanted += [("train", k) for k in ("max_iter", "steps", "warmup_iters", "checkpoint_every", "eval_every")
             if _unset(t, k)]
  wanted += [("model.anchors", "sizes")] if _unset(m.anchors, "sizes") else []
  wanted += [("model.pooler", "canonical_size")] if _unset(m.pooler, "canonical_size") else []
  if not wanted:
    return []
  train_json = config.dataset.get("train_json")
  if not train_json:
    section, key = wanted[0]
    raise ValueError(f"config.{section}.{key} is derived from the dataset, but config.dataset.train_json is not set")
  train = summarize(train_json)
  lines = []
  saved = _fine_tuning_source(config)
  if saved is not None:
    lines += _take_model_from(config, saved)

  names = tuple(name for _, name in train.categories)
  if _unset(m, "num_classes"):
    m.num_classes = len(names)
    lines.append(f"model.num_classes={len(names)}: the categories of {train.path}: {', '.join(names[:10])}"
                 + (", ..." if len(names) > 10 else ""))
  if not m.get("class_names"):
    m.class_names = names
  if _unset(inp, "max_instances"):
    inp.max_instances = max(1, max(train.instances))
    crowded = sum(n == inp.max_instances for n in train.instances)
    lines.append(f"input.max_instances={inp.max_instances}: the most instances in one training image ({crowded} "
                 f"image{'s' if crowded > 1 else ''} of {len(train.sizes)})")

  short, cap = _scale(train)
  scale_fields = [k for k in ("min_size_train", "max_size_train", "min_size_test", "max_size_test") if _unset(inp, k)]
  for key in scale_fields:
    inp[key] = {"min_size_train": (short,), "max_size_train": cap, "min_size_test": short, "max_size_test": cap}[key]
  if scale_fields:
    lines.append(f"input short side {short} px, long side at most {cap} px: the images' median short side "
                 f"{int(np.median([min(hw) for hw in train.sizes]))} px (at most {MAX_SHORT_SIDE})")
  if _unset(inp, "canvases"):
    sizes = list(train.sizes)
    if config.dataset.get("val_json"):
      sizes += list(summarize(config.dataset.val_json).sizes)
    inp.canvases = _canvases(sizes, inp, int(m.size_divisibility))
    lines.append(f"input.canvases={', '.join(f'{h}x{w}' for h, w in inp.canvases)}: the largest train and val "
                 f"images at that scale, rounded up to {m.size_divisibility}")

  if saved is None and (_unset(m.anchors, "sizes") or _unset(m.pooler, "canonical_size")):
    sides = np.asarray(train.box_sides or (32.0,)) * short / np.median([min(hw) for hw in train.sizes])
    base = int(2 ** np.clip(np.round(np.log2(np.percentile(sides, 10))), 3, 7))
    if _unset(m.anchors, "sizes"):
      m.anchors.sizes = tuple((base * 2**i,) for i in range(m.fpn.max_level - m.fpn.min_level + 1))
    if _unset(m.pooler, "canonical_size"):
      m.pooler.canonical_size = 4 * base
    lines.append(f"model.anchors.sizes from {base} px, pooler.canonical_size={m.pooler.canonical_size}: the "
                 f"objects' 10th-percentile size {np.percentile(sides, 10):.0f} px at that scale")

  steps_per_epoch = len(train.sizes) / int(t.batch_size)
  if _unset(t, "max_iter"):
    epochs = round(EPOCHS * steps_per_epoch)
    t.max_iter = int(np.clip(round(epochs / 50) * 50, MIN_ITERS, MAX_ITERS))
    lines.append(f"train.max_iter={t.max_iter}: {EPOCHS} epochs of {len(train.sizes)} images at batch "
                 f"{t.batch_size} are {epochs} steps, kept within {MIN_ITERS}..{MAX_ITERS} "
                 f"({t.max_iter / steps_per_epoch:.0f} epochs)")
  if _unset(t, "steps"):
    t.steps = (int(0.75 * t.max_iter), int(0.92 * t.max_iter))
  if _unset(t, "warmup_iters"):
    t.warmup_iters = min(100, t.max_iter // 10)
  for key in ("checkpoint_every", "eval_every"):
    if _unset(t, key):
      t[key] = max(1, t.max_iter // 2)
  return lines
