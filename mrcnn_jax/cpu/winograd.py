"""3x3 stride-1 convolutions by Winograd's minimal filtering, F(m x m, 3 x 3), and their kernel gradient.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): every m x m block of outputs is
A^T [(G k G^T) * (B^T d B)] A for the (m + 2) x (m + 2) input tile d under it, so the convolution becomes (m + 2)^2
independent (tiles, C) x (C, O) matmuls: (m + 2)^2 / m^2 multiplies per output pixel and channel pair instead of 9
(4 for m = 2, 2.25 for m = 4). The transforms are sums of shifted slices, which XLA fuses into a few passes over
memory.

Accuracy: F(2x2, 3x3)'s B and A hold only 0 and +-1 and G 0, +-1/2 and 1, so its transforms round no more than a
direct convolution does; against a float64 convolution its error is that of XLA's own float32 convolution (about
1e-6 of the largest output). F(4x4, 3x3)'s interpolation points 0, +-1, +-2 put 4, 5 and 8 into B and A, and its
error is about 1e-5 of the largest output: still 50 times below the TF32 that NVIDIA GPUs use for float32
convolutions by default.

`mrcnn_jax.cpu.conv.conv2d` uses this on CPU only, where XLA has no Winograd of its own (which layers, see its
`_winograd_for`); GPU and TPU backends pick their convolution algorithms themselves.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Transform:
  """The matrices of F(m x m, 3 x 3): B^T ((m + 2) x (m + 2)), G ((m + 2) x 3) and A^T (m x (m + 2))."""

  m: int
  bt: tuple[tuple[float, ...], ...]
  g: tuple[tuple[float, ...], ...]
  at: tuple[tuple[float, ...], ...]

  @property
  def taps(self) -> int:
    return (self.m + 2) ** 2


F2 = Transform(
    m=2,
    bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    g=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    at=((1, 1, 1, 0), (0, 1, -1, -1)),
)
F4 = Transform(
    m=4,
    bt=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1)),
    g=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
       (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
    at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
)


def _transpose(matrix):
  return tuple(zip(*matrix))


def _combine(matrix, arrays):
  """matrix @ arrays for a constant matrix and a list of equally shaped arrays, as adds (zeros skipped, +-1 without
  a multiply)."""
  out = []
  for row in matrix:
    acc = None
    for c, a in zip(row, arrays):
      if c == 0:
        continue
      term = a if c == 1 else -a if c == -1 else c * a
      acc = term if acc is None else acc + term
    out.append(acc)
  return out


def output_size(h: int, w: int, padding: int) -> tuple[int, int]:
  """Output size (Ho, Wo) of a 3x3 stride-1 convolution of an h x w map."""
  return h + 2 * padding - 2, w + 2 * padding - 2


def tile_grid(h: int, w: int, padding: int, t: Transform):
  """Output size (Ho, Wo) of a 3x3 stride-1 convolution and the (Th, Tw) m x m output tiles that cover it."""
  ho, wo = output_size(h, w, padding)
  return ho, wo, -(-ho // t.m), -(-wo // t.m)


def _windows(x, axis: int, tiles: int, m: int):
  """The m + 2 long windows at stride m along `axis` (x holds m * (tiles + 1) entries there), as m + 2 arrays of
  `tiles` entries: entry a of window i is x[m * i + a], i.e. phase a % m of block i + a // m."""
  phases = [lax.slice_in_dim(x, p, m * (tiles + 1), m, axis) for p in range(m)]
  return [lax.slice_in_dim(phases[a % m], a // m, a // m + tiles, 1, axis) for a in range(m + 2)]


def input_transform(x, padding: int, t: Transform):
  """x (N, H, W, C) zero-padded and cut into tiles, each transformed to B^T d B: ((m + 2)^2, N * Th * Tw, C)."""
  n, h, w, c = x.shape
  _, _, th, tw = tile_grid(h, w, padding, t)
  m = t.m
  # Pad to exactly m * (Th + 1) rows and columns; zeros past the input only feed outputs past (Ho, Wo), which
  # `output_transform` drops.
  xp = jnp.pad(x, ((0, 0), (padding, m * (th + 1) - h - padding), (padding, m * (tw + 1) - w - padding), (0, 0)))
  rows = _combine(t.bt, _windows(xp, 1, th, m))
  v = jnp.stack([e for r in rows for e in _combine(t.bt, _windows(r, 2, tw, m))])
  return v.reshape(t.taps, n * th * tw, c)


def kernel_transform(kernel, t: Transform):
  """G k G^T of a (3, 3, C, O) kernel: ((m + 2)^2, C, O)."""
  rows = _combine(t.g, [kernel[0], kernel[1], kernel[2]])
  return jnp.stack([e for r in rows for e in _combine(t.g, [r[0], r[1], r[2]])])


def kernel_transform_transpose(du, t: Transform):
  """The transpose of `kernel_transform`: dU ((m + 2)^2, C, O) -> G^T dU G (3, 3, C, O)."""
  r = t.m + 2
  du = du.reshape(r, r, *du.shape[1:])
  gt = _transpose(t.g)
  cols = [_combine(gt, [du[a, b] for b in range(r)]) for a in range(r)]  # [a][x]
  return jnp.stack([jnp.stack(_combine(gt, [cols[a][x] for a in range(r)])) for x in range(3)], axis=1)


def output_transform(mm, n: int, h: int, w: int, padding: int, t: Transform):
  """A^T M A for M ((m + 2)^2, N * Th * Tw, O): the (N, Ho, Wo, O) outputs."""
  ho, wo, th, tw = tile_grid(h, w, padding, t)
  r = t.m + 2
  mm = mm.reshape(r, r, n, th, tw, mm.shape[-1])
  rows = _combine(t.at, [mm[a] for a in range(r)])
  y = jnp.stack([jnp.stack(_combine(t.at, [row[b] for b in range(r)]), axis=3) for row in rows], axis=2)
  return y.reshape(n, t.m * th, t.m * tw, -1)[:, :ho, :wo]  # (N, Th, m, Tw, m, O): tiles and phases interleaved


def output_transform_transpose(dy, h: int, w: int, padding: int, t: Transform):
  """The transpose of `output_transform`: dy (N, Ho, Wo, O) -> dM = A dY A^T per tile, ((m + 2)^2, N * Th * Tw, O)."""
  n, ho, wo, o = dy.shape
  _, _, th, tw = tile_grid(h, w, padding, t)
  m = t.m
  dy = jnp.pad(dy, ((0, 0), (0, m * th - ho), (0, m * tw - wo), (0, 0))).reshape(n, th, m, tw, m, o)
  a = _transpose(t.at)
  rows = _combine(a, [dy[:, :, p] for p in range(m)])  # each (N, Th, Tw, m, O)
  dm = jnp.stack([e for r in rows for e in _combine(a, [r[:, :, :, p] for p in range(m)])])
  return dm.reshape(t.taps, n * th * tw, o)


def conv3x3(x, kernel, padding: int, t: Transform = F2):
  """A 3x3 stride-1 convolution, NHWC x HWIO -> NHWC, symmetric zero padding."""
  n, h, w, _ = x.shape
  mm = lax.dot_general(input_transform(x, padding, t), kernel_transform(kernel, t), (((2,), (1,)), ((0,), (0,))),
                       preferred_element_type=jnp.float32)
  return output_transform(mm, n, h, w, padding, t).astype(x.dtype)


def kernel_grad(x, dy, padding: int, t: Transform = F2):
  """d loss / d kernel of `conv3x3` (3, 3, C, O): dU = V^T dM for each of the (m + 2)^2 tile positions (matmuls
  over the tiles), then G^T dU G."""
  _, h, w, _ = x.shape
  v = input_transform(x, padding, t)
  dm = output_transform_transpose(dy, h, w, padding, t)
  # dM transposed once from memory, then standard-form matmuls (see `conv._pointwise_kernel_grad_cpu`).
  dm_t = jnp.swapaxes(lax.optimization_barrier(dm), 1, 2)
  du = jnp.matmul(dm_t, v, preferred_element_type=jnp.float32)  # (taps, O, C)
  return kernel_transform_transpose(jnp.swapaxes(du, 1, 2), t).astype(dy.dtype)
