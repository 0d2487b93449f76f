"""mrcnn_jax: Mask R-CNN for JAX.

Importing the package is cheap (it does not import JAX); import the submodules you use:
`mrcnn_jax.ops` (box, anchor, NMS, matching, RoIAlign and mask ops) and `mrcnn_jax.kernels` (Pallas kernels).
"""

__version__ = "0.1.0"
