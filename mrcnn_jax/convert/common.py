"""What the converters share: array layout conversions, and a tree builder that accounts for every key."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def conv_kernel(w):
  """torch Conv2d weight (out, in, kh, kw) -> flax (kh, kw, in, out)."""
  return np.transpose(w, (2, 3, 1, 0))


def deconv_kernel(w):
  """torch ConvTranspose2d weight (in, out, kh, kw) -> the (kh, kw, in, out) plain kernel of `layers.conv_transpose`
  (spatially flipped: a transposed convolution is a convolution with the flipped kernel)."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1))[::-1, ::-1])


def dense_kernel(w):
  """torch Linear weight (out, in) -> flax (in, out)."""
  return np.transpose(w, (1, 0))


def fc_after_pool_kernel(w, channels: int, size: int):
  """The first FC after RoIAlign: torch flattens (C, H, W), mrcnn_jax (H, W, C). (out, C*H*W) -> (H*W*C, out)."""
  out = w.shape[0]
  return np.transpose(w.reshape(out, channels, size, size), (2, 3, 1, 0)).reshape(size * size * channels, out)


class TreeBuilder:
  """Builds {"params": ..., "batch_stats": ...} from a flat name -> array mapping, recording which names were read."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], source: str):
    self.state = {k: np.asarray(v) for k, v in state_dict.items()}
    self.source = source
    self.used: set[str] = set()
    self.variables: dict = {"params": {}, "batch_stats": {}}

  def get(self, key: str) -> np.ndarray:
    if key not in self.state:
      raise KeyError(f"{self.source}: the checkpoint has no key {key!r}")
    self.used.add(key)
    return self.state[key]

  def has(self, key: str) -> bool:
    return key in self.state

  def ignore(self, key: str) -> None:
    if key in self.state:
      self.used.add(key)

  def put(self, collection: str, path: tuple[str, ...], value: np.ndarray) -> None:
    node = self.variables[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    if path[-1] in node:
      raise ValueError(f"{self.source}: {'/'.join(path)} was written twice")
    node[path[-1]] = np.asarray(value, np.float32)

  def unused(self) -> list[str]:
    return sorted(set(self.state) - self.used)


def check_against(variables, expected, source: str) -> None:
  """Every leaf of `expected` (a pytree of arrays or ShapeDtypeStructs) exists in `variables` with its shape, and
  nothing else does. Errors name the key."""
  import jax

  got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"{source}: converted variables do not fit the model: missing {missing[:10]}"
                     f"{' ...' if len(missing) > 10 else ''}; unexpected {extra[:10]}{' ...' if len(extra) > 10 else ''}")
  for k in want:
    if tuple(got[k].shape) != tuple(want[k].shape):
      raise ValueError(f"{source}: {k} has shape {tuple(got[k].shape)}; the model expects {tuple(want[k].shape)}")
