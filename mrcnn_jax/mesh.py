"""The device mesh that training and evaluation run over: 1-D, data parallel."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


def make_mesh(devices=None, data_axis: str = "data") -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all devices of all processes) with axis `data_axis`."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: shardings are given at the jit boundary and XLA propagates them (the default of explicit-sharding
  # meshes changed across JAX releases, so say it).
  return Mesh(np.asarray(devices), (data_axis,), axis_types=(AxisType.Auto,))
