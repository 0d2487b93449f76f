"""The groups of scripts/benchmark.py, one module each, and what they share.

  common   Row (one line of the table), the timing helpers (median of warm runs, compile apart), peak RSS
  ops      RoIAlign, NMS and mask paste against torchvision's ops
  model    R50-FPN Mask R-CNN and Keypoint R-CNN inference against torchvision's models (a subprocess per side)
  data     the training loader (no torch side)
  train    one R50-FPN training step against torchvision's (a subprocess per side)
  device   the accelerator check, mrcnn_jax alone: Pallas RoIAlign against XLA, inference and train-step images/s,
           compile times, peak device memory (device.py: the parent, table and JSON; device_parts.py: the parts, each
           in its own time-boxed subprocess)

Every group module has `run(args) -> rows` (the CLI prints them); the groups with subprocesses also `worker(args)`,
which the CLI calls in the subprocess and whose dict it prints as the last line of stdout (JSON). common, model and
train import JAX only inside their JAX-side functions, so that the torch workers stay free of it; ops and data import
it at their top, and the CLI imports a group's module only when that group runs. The device group's parent process
imports no JAX at all: it would hold the accelerator that its parts' subprocesses need.
"""
