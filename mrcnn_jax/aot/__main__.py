r"""The command line of `mrcnn_jax.aot` (flags in, one `run` out; the package docstring says what it reports):

  python -m mrcnn_jax.aot --config=configs/FILE.py[:arg] --topology=v5e:2x2 [--dtype=bfloat16] [--json=PATH] \
      [--batch_per_chip=N] [--search_max_batch] [--programs=train,infer] [--hbm_gib=G] [--config.key=value ...]

Exit codes: 0 every program fits; 1 bad flags (absl's own refusals, --programs); 2 refused by `run`, in one line
(AotUnavailable: no libtpu, an unknown topology; ValueError: a batch that does not divide over the devices, a budget
that is not positive); 3 a program that does not fit (with --search_max_batch: not even one image per chip fits).
"""

from __future__ import annotations

import os
import sys

import jax

from mrcnn_jax import aot
from mrcnn_jax.aot.compile import run
from mrcnn_jax.aot.programs import PROGRAMS
from mrcnn_jax.aot.topology import AotUnavailable


def main(argv):
  from absl import flags

  from mrcnn_jax import atomic

  if len(argv) > 1:
    raise SystemExit(f"mrcnn_jax.aot: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  if f.dtype:
    config.model.compute_dtype = f.dtype
  programs = tuple(p.strip() for p in f.programs.split(",") if p.strip())
  bad = [p for p in programs if p not in PROGRAMS]
  if bad or not programs:
    raise SystemExit(f"mrcnn_jax.aot: --programs must name some of {PROGRAMS}, got {f.programs!r}")
  try:
    result = run(config, f.topology, programs=programs, batch_per_chip=f.batch_per_chip, search=f.search_max_batch,
                 hbm_gib=f.hbm_gib)
  except (AotUnavailable, ValueError) as e:
    print(f"mrcnn_jax.aot: {e}", file=sys.stderr)
    sys.exit(2)
  result["config"] = config.to_dict()
  if f.json:
    atomic.write_json(f.json, result)
    print(f"wrote {f.json}")
  # A program that does not fit fails the command, unless finding what fits was the question.
  nothing_fits = any(v["max_batch_per_chip"] == 0 for v in result.get("max_batch_per_chip", {}).values())
  if (result["errors"] and not f.search_max_batch) or nothing_fits:
    for error in result["errors"]:
      print(f"mrcnn_jax.aot: {error}", file=sys.stderr)
    sys.exit(3)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file: configs/FILE.py[:arg].", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Overrides config.model.compute_dtype.")
  flags.DEFINE_integer("batch_per_chip", None, "Images per chip (default: train.batch_size / devices).")
  flags.DEFINE_bool("search_max_batch", False, "Also find the largest batch per chip whose train step fits.")
  flags.DEFINE_string("programs", ",".join(PROGRAMS), "Programs to compile: train, infer or both.")
  flags.DEFINE_string("json", None, "Write the whole report as JSON here (atomically).")
  flags.DEFINE_float("hbm_gib", None, "Fit in this many GiB per chip instead of the chip's whole HBM.")
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  from absl import app

  # Deviceless: the only backend JAX initializes is the CPU's, whatever this machine has (on a TPU VM its chips would
  # be claimed otherwise). JAX_PLATFORMS, when set, still decides.
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  # --help prints the main module's docstring: the package's, which says what the command compiles and reports.
  __doc__ = aot.__doc__
  _define_flags()
  app.run(main)
