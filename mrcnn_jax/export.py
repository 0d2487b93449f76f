r"""The inference program as a serialized `jax.export` artifact (StableHLO), runnable without the model's code.

  python -m mrcnn_jax.export --checkpoint=DIR --out=EXPORT_DIR --batch_size=2 [--config=configs/FILE.py] \
      [--platforms=cpu,cuda,tpu] [--config.key=value ...]

(without --config, the config saved with the checkpoint; a --config must agree with its model fields except those
given as --config.model.* overrides, `checkpoint.inference_config`; errors print one line, the traceback with
--debug)

  fn = load_exported("EXPORT_DIR")            # needs jax and numpy only, not mrcnn_jax.modeling
  out = fn(images, image_info)                # (B, H, W, 3) float32, (B, 6) float32 -> dict of fixed-size arrays

An export is a directory, written atomically (a hidden temporary sibling renamed into place):

  EXPORT_DIR/inference_<H>x<W>.jax_exported   `jax.export.Exported.serialize()` of `build_infer(config)` lowered
                                      for a fixed batch and one canvas of the config (`input.canvases`), one file
                                      per canvas: the StableHLO module and its calling convention
  EXPORT_DIR/weights.npz              the variables, one array per leaf, in the programs' argument order
  EXPORT_DIR/manifest.json            batch, canvases, platforms, input / output / weight names, shapes and dtypes,
                                      and the config the programs were built from

A loaded export runs the program of the canvas its images are padded to (`data.transforms.choose_canvas`); every
canvas gives the same detections for an image that fits it (`ops.frames`).

The weights are program arguments, not constants closed over in the program: constants are inlined into the StableHLO
module as dense literals, so the serialized module would grow by the model's size (177 MB for R50-FPN in float32) up
to flatbuffers' 2 GiB limit on one buffer, which larger models would pass, and XLA would then compile a module
carrying every weight as a literal. As arguments, the module stays a few hundred kB, compiles like the jitted program,
the weights go to the device once and stay there between calls, and another checkpoint of the same architecture can
be run by the same program.

Platforms: `platforms=("cpu", "cuda", "tpu")` lowers one module for all of them (it then takes the platform as a
hidden first argument and picks the matching branch of every `lax.platform_dependent`, e.g. the RoIAlign kernel's),
and the loaded program runs on whichever the default device is. Lowering needs no device of that platform, so a CPU
machine exports for accelerators. RoIAlign's implementation is chosen when the program is traced: with
`model.pooler.impl` unset that is the exporting machine's default (`kernels.tuning.DEFAULT_IMPL`, XLA everywhere
today); "pallas" exports the Mosaic kernel for TPU, while its Triton (GPU) custom call has no serialization
compatibility guarantee and `jax.export` refuses it.

Serialization needs the `flatbuffers` package (jax imports it to serialize and deserialize).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax import export as jax_export

from mrcnn_jax import atomic

FORMAT_VERSION = 1
ARTIFACT_PATTERN = "inference_{}x{}.jax_exported"
WEIGHTS_FILE = "weights.npz"
MANIFEST_FILE = "manifest.json"
INPUT_NAMES = ("images", "image_info")
IMAGE_INFO_SIZE = 6  # data.transforms.IMAGE_INFO_SIZE, repeated so that loading imports no mrcnn_jax code
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------


def _leaf_name(path) -> str:
  """A pytree key path -> "params/backbone/stem/conv/kernel"."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _storable(array: np.ndarray) -> np.ndarray:
  """npz holds numpy's own dtypes only: bfloat16 and other ml_dtypes arrays (kind "V") are stored as raw bits."""
  return array.view(f"u{array.dtype.itemsize}") if array.dtype.kind == "V" else array


def _config_dict(config) -> dict:
  """The config as a JSON-compatible dict (ml_collections' best effort for values JSON cannot hold)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=repr))


def _shape_dtype(aval) -> dict:
  return {"shape": [int(d) for d in aval.shape], "dtype": str(np.dtype(aval.dtype))}


def export_inference(config, variables: Mapping, path, *, batch_size: int, platforms: Sequence[str] = ("cpu",),
                     overwrite: bool = False) -> pathlib.Path:
  """Lower `build_infer(config)` for a fixed batch and each of the config's canvases, and write them with the weights.

  Args:
    config: the whole ml_collections ConfigDict (`model` builds the program; `input.canvases` are the canvases; all
      of it is stored in the manifest, so that a Predictor can be built from the export alone).
    variables: the model's variables, {"params": ..., "batch_stats": ...} (numpy or jax arrays).
    path: the export directory to create (see the module docstring for its files).
    batch_size: B, the images per call the program takes (static).
    platforms: any of "cpu", "cuda", "rocm", "tpu"; more than one lowers a multi-platform module.
    overwrite: replace an existing `path` (still atomically).

  Returns:
    The absolute path of the export directory.
  """
  # Imported here: loading an export must not need the model's code, and this module serves both.
  from mrcnn_jax.modeling import mask_rcnn  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path).expanduser().absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  platforms = tuple(str(p).lower() for p in platforms)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if not platforms or unknown:
    raise ValueError(f"platforms must be a non-empty subset of {PLATFORMS}, got {platforms}")
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  batch_size = int(batch_size)
  from mrcnn_jax.data import transforms  # pylint: disable=import-outside-toplevel

  canvas_list = transforms.canvases(config.input)

  leaves, treedef = jax.tree_util.tree_flatten_with_path(dict(variables))
  names = [_leaf_name(p) for p, _ in leaves]
  if len(set(names)) != len(names):
    raise ValueError("export_inference: two variables flatten to the same name")
  weights = [np.asarray(jax.device_get(x)) for _, x in leaves]
  variable_specs = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights])
  infer = mask_rcnn.build_infer(config)
  serialized, inputs = {}, {}
  for canvas_h, canvas_w in canvas_list:
    input_specs = (jax.ShapeDtypeStruct((batch_size, canvas_h, canvas_w, 3), np.float32),
                   jax.ShapeDtypeStruct((batch_size, IMAGE_INFO_SIZE), np.float32))
    exported = jax_export.export(infer, platforms=platforms)(variable_specs, *input_specs)
    key = ARTIFACT_PATTERN.format(canvas_h, canvas_w)
    serialized[key] = exported.serialize()
    inputs[key] = [{"name": name, **_shape_dtype(spec)} for name, spec in zip(INPUT_NAMES, input_specs)]
  # The outputs' shapes do not depend on the canvas (fixed detection counts).
  outputs = jax.tree.unflatten(exported.out_tree, [_shape_dtype(a) for a in exported.out_avals])
  manifest = {
      "format_version": FORMAT_VERSION,
      "jax_version": jax.__version__,
      "platforms": list(exported.platforms),
      "calling_convention_version": exported.calling_convention_version,
      "batch_size": batch_size,
      "canvases": [list(hw) for hw in canvas_list],
      "artifacts": {f"{h}x{w}": ARTIFACT_PATTERN.format(h, w) for h, w in canvas_list},
      "weights_file": WEIGHTS_FILE,
      "inputs": inputs,
      "outputs": {name: outputs[name] for name in sorted(outputs)},
      "weights": [{"name": n, "shape": list(w.shape), "dtype": str(w.dtype)} for n, w in zip(names, weights)],
      "config": _config_dict(config),
  }
  manifest_text = json.dumps(manifest, indent=2)

  def write(tmp: pathlib.Path) -> None:
    for name, data in serialized.items():
      (tmp / name).write_bytes(data)
    # Zip members named by index: names hold "/" and would read as folders to a zip tool; the manifest maps them.
    np.savez(tmp / WEIGHTS_FILE, **{f"{i:05d}": _storable(w) for i, w in enumerate(weights)})
    (tmp / MANIFEST_FILE).write_text(manifest_text)  # last: its presence marks a complete export

  if not atomic.write_dir(path, write, replace=overwrite):  # `path` appeared while the export was being written
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  return path


# --------------------------------------------------------------------------------------------------------------------
# Load and run (jax and numpy only)
# --------------------------------------------------------------------------------------------------------------------


class ExportedInference:
  """A loaded export: `fn(images, image_info) -> dict`, like `build_infer(config)` with its variables bound.

  Attributes:
    manifest: the parsed manifest.json; `manifest["config"]` is the config as a plain dict (wrap it in
      `ml_collections.ConfigDict` for a Predictor).
    exported: {(canvas_h, canvas_w): the deserialized `jax.export.Exported` of that canvas}.
    variables: the weights, a list of arrays on the default device, in the programs' argument order.
    batch_size, canvases: the static input sizes: the batch, and the (H, W) canvases there is a program for.
    platforms: the platforms the programs were lowered for.

  `infer(variables, images, image_info)` is the same program with the weights as an argument, the signature
  `predictor.Predictor(infer_fn=...)` takes:

    loaded = load_exported(path)
    predictor = Predictor(ml_collections.ConfigDict(loaded.manifest["config"]), loaded.variables,
                          infer_fn=loaded.infer, batch_size=loaded.batch_size)
  """

  def __init__(self, manifest: dict, exported: dict, weights: list):
    self.manifest = manifest
    self.exported = exported
    self.batch_size = int(manifest["batch_size"])
    self.canvases = list(exported)
    self.platforms = next(iter(exported.values())).platforms
    self.variables = [jax.device_put(w) for w in weights]  # once: every call reuses them on the device
    self._call = jax.jit(self.infer)

  def _program(self, images):
    hw = tuple(int(s) for s in np.shape(images)[1:3])
    if hw not in self.exported:
      listed = ", ".join(f"{h}x{w}" for h, w in self.canvases)
      raise ValueError(f"images of canvas {hw[0]}x{hw[1]}: the export has programs for {listed} only")
    return self.exported[hw]

  def infer(self, variables, images, image_info) -> dict:
    """The exported program of the images' canvas on explicit weights (a list as `self.variables`); traceable and
    jittable."""
    program = self._program(images)
    args, kwargs = jax.tree.unflatten(program.in_tree, [*variables, images, image_info])
    return program.call(*args, **kwargs)

  def __call__(self, images, image_info) -> dict:
    """images (B, H, W, 3) float32 normalized and padded to one of the canvases, image_info (B, 6) float32 (see
    `data.transforms.preprocess`) -> the program's dict of fixed-size arrays (boxes (B, D, 4) XYXY canvas pixels,
    scores (B, D), classes (B, D), valid (B, D), masks (B, D, 28, 28), keypoints (B, D, 17, 3), ...)."""
    b = self.batch_size
    self._program(images)
    h, w = np.shape(images)[1:3]
    for name, value, shape in (("images", images, (b, h, w, 3)), ("image_info", image_info, (b, IMAGE_INFO_SIZE))):
      if tuple(np.shape(value)) != shape:
        raise ValueError(f"{name} must have shape {shape} (the export's batch), got {np.shape(value)}")
    # Cast only what is not float32 already, so that arrays on a device are not pulled back to the host.
    images, image_info = (x if getattr(x, "dtype", None) == np.float32 else np.asarray(x, np.float32)
                          for x in (images, image_info))
    return self._call(self.variables, images, image_info)


def load_exported(path) -> ExportedInference:
  """Load an export written by `export_inference`. Imports nothing of mrcnn_jax's model.

  Raises FileNotFoundError for a directory that is not a complete export, ValueError for weights that do not match
  the manifest or the program.
  """
  path = pathlib.Path(path).expanduser()
  manifest_file = path / MANIFEST_FILE
  if not manifest_file.is_file():
    raise FileNotFoundError(f"{path} is not an export: it has no {MANIFEST_FILE}")
  manifest = json.loads(manifest_file.read_text())
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{manifest_file}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
  exported = {}
  for name in manifest["artifacts"].values():
    program = jax_export.deserialize(bytearray((path / name).read_bytes()))
    exported[tuple(int(s) for s in program.in_avals[-2].shape[1:3])] = program
  first = next(iter(exported.values()))

  specs = manifest["weights"]
  weights = []
  with np.load(path / manifest["weights_file"]) as npz:
    if len(npz.files) != len(specs):
      raise ValueError(f"{path / manifest['weights_file']} holds {len(npz.files)} arrays, the manifest "
                       f"{len(specs)}")
    for i, spec in enumerate(specs):
      array = npz[f"{i:05d}"]
      dtype = np.dtype(spec["dtype"])  # "bfloat16" and friends resolve through ml_dtypes, which jax imports
      if array.dtype != dtype:
        array = array.view(dtype)
      if list(array.shape) != spec["shape"]:
        raise ValueError(f"weight {spec['name']} has shape {list(array.shape)}, the manifest says {spec['shape']}")
      weights.append(array)
  if first.in_tree.num_leaves != len(weights) + len(INPUT_NAMES):
    raise ValueError(f"{path}: the program takes {first.in_tree.num_leaves - len(INPUT_NAMES)} weights, "
                     f"the export holds {len(weights)}")
  for aval, weight, spec in zip(first.in_avals, weights, specs):
    if tuple(aval.shape) != weight.shape or np.dtype(aval.dtype) != weight.dtype:
      raise ValueError(f"weight {spec['name']}: {weight.dtype}{list(weight.shape)} does not match the program's "
                       f"{np.dtype(aval.dtype)}{list(aval.shape)}")
  return ExportedInference(manifest, exported, weights)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def _define_flags():
  """Flags exist only when this module runs as a program, so importing it (beside other entry points) defines none."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import cli  # pylint: disable=import-outside-toplevel

  cli.define_checkpoint_flags()
  flags.DEFINE_string("out", None, "Export directory to write.")
  flags.DEFINE_integer("batch_size", 1, "Images per call of the exported program (static).")
  flags.DEFINE_list("platforms", ["cpu"], "Platforms to lower for: any of cpu, cuda, rocm, tpu.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
  flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
  from absl import app, flags, logging  # pylint: disable=import-outside-toplevel

  from mrcnn_jax import checkpoint, cli  # pylint: disable=import-outside-toplevel

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  variables, saved = checkpoint.load_inference(f.checkpoint)
  config = cli.config_for_checkpoint(f.checkpoint, saved)
  path = export_inference(config, variables, f.out, batch_size=f.batch_size, platforms=f.platforms,
                          overwrite=f.overwrite)
  logging.info("exported to %s (batch %d, canvases %s, platforms %s)", path, f.batch_size,
               [tuple(hw) for hw in config.input.canvases], ",".join(f.platforms))
  return 0


if __name__ == "__main__":
  from mrcnn_jax import cli as _cli  # pylint: disable=import-outside-toplevel

  _define_flags()
  _cli.run("mrcnn_jax.export", main)
