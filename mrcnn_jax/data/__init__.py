"""Host-side input of Mask R-CNN: image transforms (resize, normalize, pad to the canvas), datasets and batching.

Everything here is numpy / PIL and runs on the host; arrays leave for the devices as fixed-shape batches. Each
module is imported on its own (`from mrcnn_jax.data import transforms`).
"""
