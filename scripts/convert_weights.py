#!/usr/bin/env python
r"""Convert torchvision or Detectron2 weights to an mrcnn_jax variables checkpoint (orbax, with config and metadata).

Usage:
  python scripts/convert_weights.py --from torchvision maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out /tmp/tv_maskrcnn
  python scripts/convert_weights.py --from detectron2 model_final_a54504.pkl --out /tmp/d2_maskrcnn \
      [--config configs/mask_rcnn_R50_FPN_1x.py[:arg]] [--overwrite]

torchvision: a .pth (read with torch) or an .npz of name -> array; the default config is
configs/mask_rcnn_R50_FPN_torchvision.py, or configs/keypoint_rcnn_R50_FPN_torchvision.py for a keypoint state dict.
detectron2: a model-zoo .pkl (read without torch); the default config is configs/mask_rcnn_R50_FPN_1x.py, or
configs/keypoint_rcnn_R50_FPN_1x.py for a keypoint model. An MSRA ImageNet backbone (R-50.pkl, R-101.pkl: Caffe2
names) converts to the backbone alone, of the config's depth (pass configs/mask_rcnn_R101_FPN_3x.py for R-101.pkl), and
is checked against the config's backbone only; pixel mean/std carried by a Detectron2 file are compared with the
config's (a warning when they differ) and kept in metadata.json.

The converted variables are checked against the config's model (every array present, with its shape) before anything
is written; the output directory appears complete or not at all. Exit status 0 on success, 1 on error (one line on
stderr naming the file or key; --debug, or MRCNN_JAX_DEBUG=1, shows the traceback), 2 on bad flags.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from mrcnn_jax import config_files

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
SOURCES = ("torchvision", "detectron2")

# Per source: (default config, keypoint-model config). A state dict holding keypoint-head keys is a Keypoint R-CNN.
DEFAULT_CONFIGS = {
    "torchvision": ("mask_rcnn_R50_FPN_torchvision.py", "keypoint_rcnn_R50_FPN_torchvision.py"),
    "detectron2": ("mask_rcnn_R50_FPN_1x.py", "keypoint_rcnn_R50_FPN_1x.py"),
}
KEYPOINT_PREFIX = "roi_heads.keypoint_head."


class ConversionError(Exception):
  """A failure the user can act on; main() prints it and exits 1."""


def parse_args(argv) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the weights' home framework")
  parser.add_argument("input", type=pathlib.Path, help="the weights file (.pth / .npz for torchvision, .pkl for "
                      "detectron2)")
  parser.add_argument("--out", required=True, type=pathlib.Path, help="the checkpoint directory to write")
  parser.add_argument("--config", default=None, help="configs/FILE.py or FILE.py:arg (default: by source and heads)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
  parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback instead of one "
                      "line (also MRCNN_JAX_DEBUG=1)")
  return parser.parse_args(argv)


def load_config(spec: str):
  """get_config([arg]) of a config file given as `path.py` or `path.py:arg`, loaded by path (as the entry points do).

  A relative path that does not exist from the working directory is looked up from the repository root.
  """
  try:
    return config_files.load_config(spec, search_root=REPO)
  except FileNotFoundError as e:
    raise ConversionError(str(e)) from None


def read_state_dict(source: str, path: pathlib.Path) -> dict:
  """The name -> numpy array mapping of a weights file; each source's converter is imported only when used."""
  if source == "torchvision":
    from mrcnn_jax.convert import torchvision as converter
    return converter.load_state_dict_file(path)
  return _detectron2().load_pickle(path)


def _detectron2():
  try:
    from mrcnn_jax.convert import detectron2
  except ModuleNotFoundError as e:
    if e.name != "mrcnn_jax.convert.detectron2":
      raise
    raise ConversionError("--from detectron2 is not available in this version of mrcnn_jax "
                          "(mrcnn_jax.convert.detectron2 is missing)") from None
  return detectron2


def is_msra_backbone(state_dict) -> bool:
  """An MSRA/Detectron ImageNet backbone (R-50.pkl): Caffe2 blob names, not Detectron2 module names."""
  return "conv1_w" in state_dict and "res_conv1_bn_s" in state_dict


def convert_state_dict(source: str, state_dict, config) -> tuple[dict, dict]:
  """(variables, extras): extras holds what the converter reports beside the arrays ("dropped" keys, the weights'
  "pixel_mean" / "pixel_std" when the file carries them)."""
  if source == "torchvision":
    from mrcnn_jax.convert import torchvision as converter
    return converter.convert_state_dict(state_dict), {}
  detectron2 = _detectron2()
  if is_msra_backbone(state_dict):
    # The blobs do not say their depth unambiguously to a name-by-name converter: the config does.
    depth = config.model.backbone.depth
    try:
      return detectron2.convert_msra_backbone(state_dict, depth, eps=config.model.backbone.norm_eps,
                                              return_extras=True)
    except (KeyError, ValueError) as e:
      message = e.args[0] if isinstance(e, KeyError) and e.args else e
      raise ConversionError(f"converting as a ResNet-{depth} backbone (the config's model.backbone.depth): {message}"
                            " (pass the matching --config)") from None
  return detectron2.convert_state_dict(state_dict, return_extras=True)


def check_pixel_stats(extras: dict, config) -> list[str]:
  """Warnings for the pixel mean/std a checkpoint carries that differ from the config's input normalization."""
  warnings = []
  for name in ("pixel_mean", "pixel_std"):
    if name in extras and not np.allclose(extras[name], np.asarray(getattr(config.input, name)), atol=1e-3):
      warnings.append(f"the weights were trained with {name} {np.round(extras[name], 3).tolist()}, the config says "
                      f"{list(getattr(config.input, name))}")
  return warnings


def check_variables(variables, config, source: str) -> str:
  """Check the converted variables against the config's model; returns what was checked ("model" or "backbone").

  A backbone-only conversion (an ImageNet backbone, params holding nothing but "backbone") is checked against the
  model's backbone: it initializes the backbone of a detector, never a whole one.
  """
  import jax

  from mrcnn_jax.convert.common import check_against
  from mrcnn_jax.modeling import mask_rcnn

  expected = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
  checked = "backbone" if set(variables.get("params", {})) == {"backbone"} else "model"
  if checked == "backbone":
    expected = {c: {"backbone": tree["backbone"]} for c, tree in expected.items() if "backbone" in tree}
  check_against(variables, expected, source)
  return checked


def _count(tree) -> tuple[int, int]:
  import jax

  leaves = jax.tree.leaves(tree)
  return len(leaves), int(sum(np.size(x) for x in leaves))


def convert(source: str, input_path: pathlib.Path, out: pathlib.Path, config_spec: str | None = None,
            overwrite: bool = False) -> str:
  """Read, convert, check and save; returns the one-line summary. Raises on any error, leaving `out` untouched."""
  from mrcnn_jax import checkpoint

  if source not in SOURCES:
    raise ConversionError(f"unknown --from {source!r}; expected one of {', '.join(SOURCES)}")
  # Fail before the (slow) conversion rather than after it.
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ConversionError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")
  state_dict = read_state_dict(source, input_path)
  if config_spec is None:
    default, keypoint = DEFAULT_CONFIGS[source]
    has_keypoints = any(k.startswith(KEYPOINT_PREFIX) for k in state_dict)
    config_spec = str(CONFIG_DIR / (keypoint if has_keypoints else default))
  config = load_config(config_spec)
  try:
    variables, extras = convert_state_dict(source, state_dict, config)
  except (KeyError, ValueError) as e:
    # str(KeyError) is the repr of its argument, and the converters' KeyErrors carry whole messages.
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise ConversionError(f"{input_path}: {message}") from None
  try:
    checked = check_variables(variables, config, source)
  except ValueError as e:
    raise ConversionError(f"{input_path} does not fit the model of {config_spec}: {e} (pass the matching --config)") \
        from None
  for warning in check_pixel_stats(extras, config):
    print(f"convert_weights: warning: {warning}", file=sys.stderr)
  metadata = {"source": source, "file": str(input_path.resolve()), "config": config_spec, "checked_against": checked}
  metadata.update({k: np.asarray(v).tolist() for k, v in extras.items() if k in ("pixel_mean", "pixel_std")})
  if extras.get("dropped"):
    metadata["dropped"] = list(extras["dropped"])
  written = checkpoint.save_variables(out, variables, config=config, metadata=metadata, overwrite=overwrite)
  n_params_arrays, n_params = _count(variables.get("params", {}))
  n_arrays, _ = _count(variables)
  return (f"{source} {input_path.name}: {n_arrays} arrays ({n_params_arrays} params, {n_params:,} parameters), "
          f"checked against the {checked} of {pathlib.Path(config_spec.partition(':')[0]).name}, "
          f"written to {written}")


def main(argv=None) -> int:
  """The command line (argv without the program name; None: sys.argv) -> exit status, 0 on success."""
  try:
    args = parse_args(argv)
  except SystemExit as e:  # argparse has printed the usage error (or --help)
    return int(e.code or 0)
  from mrcnn_jax import cli

  try:
    print(convert(args.source, args.input, args.out, args.config, args.overwrite))
  except Exception as e:  # every error ends in one line; the traceback is for --debug
    if args.debug or cli.debug_enabled():
      raise
    if isinstance(e, (ConversionError, FileNotFoundError, FileExistsError, ValueError)):  # say what to fix
      print(f"convert_weights: error: {' '.join(str(e).split())}", file=sys.stderr)
    else:
      print(f"{cli.error_line('convert_weights', e)} (--debug shows the traceback)", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
