"""Pallas kernels of mrcnn_jax, shipped in the package as `mrcnn_jax.kernels` (source folder: kernels/).

- `roi_align`: the weighted gather of RoIAlign (Pallas for GPU, with a custom VJP) and its XLA reference.
- `tuning`: block sizes and the per-backend default implementation.
"""
