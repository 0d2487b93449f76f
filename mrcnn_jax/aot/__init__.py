r"""Compile the train step and the inference program for a TPU topology on a machine that has no TPU.

  python -m mrcnn_jax.aot --config=configs/FILE.py[:arg] --topology=v5e:2x2 [--dtype=bfloat16] [--json=PATH] \
      [--batch_per_chip=N] [--search_max_batch] [--programs=train,infer] [--hbm_gib=G] [--config.key=value ...]

libtpu (the `tpu-aot` extra: `pip install -e '.[tpu-aot]'`) compiles for a named topology without the chips:
`jax.experimental.topologies.get_topology_desc` gives abstract devices of that slice, a Mesh of them takes the
program's shardings, and `jit(...).lower(abstract inputs).compile()` runs XLA:TPU's whole pipeline (SPMD
partitioning, fusion, layout, memory assignment) on the CPU. Nothing runs and no array is made: the state is
`jax.eval_shape` of `train.create_train_state`, the batch `jax.ShapeDtypeStruct`s with their shardings.

For each canvas of the config (`canvases`) and each program it reports, per device (one device is one chip; a v4 or
v5p chip is one megacore device, as JAX sees it on those machines):

- compiled memory (`compiled.memory_analysis()`): arguments, outputs (and how much of them alias donated
  arguments), temporaries, generated code; total = arguments + outputs - aliased + temporaries + code, against
  the chip's HBM (`HBM_BYTES`). A program over the HBM, or one XLA refuses with RESOURCE_EXHAUSTED, is `DoesNotFit`.
- XLA's FLOP estimate of one step (`compiled.cost_analysis()["flops"]`, per device) against `hand_flops`, the
  convolutions and dense layers counted by hand (its docstring says where the two differ and why).
- ops that are slow on TPU, counted in the compiled HLO text (`slow_ops`): scatters, gathers (and the large
  operands they read), while loops, conditionals, sorts, host transfers, f64 ops, each with where it comes from.

The train step is `train.jit_train_step` over a 1-D Mesh of the topology's devices: the global batch
(batch_per_chip x devices; default the config's train.batch_size) sharded on the data axis, the state replicated
and donated. The inference program is `mask_rcnn.build_infer`'s, its batch sharded the same way and the variables
replicated. `--search_max_batch` finds the largest batch per chip whose train step fits (`search_max_batch`).

Refusals are one line and a non-zero exit: no libtpu, an unknown topology (`AotUnavailable`, exit 2), a program
that does not fit (`DoesNotFit`, exit 3).

The modules (every name in backquotes below is also `mrcnn_jax.aot.<name>`):
  topology.py   libtpu's environment and version, the slice's abstract devices, HBM per chip, `Target`
  programs.py   the programs on abstract inputs: `abstract_state`, `abstract_train_batch`, `lower_train_step`,
                `lower_infer`, `canvases`
  compile.py    `compile_program` (memory, fit, FLOPs, slow ops), `search_max_batch`, `describe`, `run`
  flops.py      `hand_flops`, the hand count
  hlo.py        `slow_ops`, the census of the compiled HLO text
  __main__.py   the command line: flags in, `run` out, exit codes
"""

from mrcnn_jax.aot.compile import (DoesNotFit, compile_program, default_batch_per_chip, describe, estimate_max_batch,
                                   memory_report, run, search_max_batch)
from mrcnn_jax.aot.flops import hand_flops
from mrcnn_jax.aot.hlo import LARGE_GATHER_BYTES, slow_ops
from mrcnn_jax.aot.programs import (PROGRAMS, abstract_state, abstract_train_batch, canvases, lower_infer,
                                    lower_train_step)
from mrcnn_jax.aot.topology import (HBM_BYTES, AotUnavailable, GiB, Target, hbm_bytes, libtpu_environment,
                                    libtpu_installed, libtpu_version, topology_devices)

# The names the command, the tests and the README use as `aot.X`, re-exported from the modules that define them.
__all__ = [
    "GiB", "HBM_BYTES", "LARGE_GATHER_BYTES", "PROGRAMS", "AotUnavailable", "DoesNotFit", "Target",
    "abstract_state", "abstract_train_batch", "canvases", "compile_program", "default_batch_per_chip", "describe",
    "estimate_max_batch", "hand_flops", "hbm_bytes", "libtpu_environment", "libtpu_installed", "libtpu_version",
    "lower_infer", "lower_train_step", "memory_report", "run", "search_max_batch", "slow_ops", "topology_devices",
]
