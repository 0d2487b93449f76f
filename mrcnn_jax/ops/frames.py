"""Image frames: the part of a padded canvas that belongs to one image, so that results never depend on the canvas.

torchvision and Detectron2 pad each image (at the bottom and right, with zeros) to its resized size rounded up to
`size_divisibility` (32 for FPN) — for a batch, to the largest image's — and the network then sees exactly that
tensor: convolutions read zeros past its edge, RoIAlign clamps to its last row and column, and the RPN ranks the
anchors of its grid. mrcnn_jax pads to one of a few static canvases instead (`data.transforms.choose_canvas`), so
an image's canvas is usually larger than that. Its *frame* is the padded size it would have alone in either
framework:

    frame = ceil(resized size / size_divisibility) * size_divisibility          (per image, (B, 2) int32)

and at a feature level of stride s the frame covers the first ceil(frame / s) rows and columns (`frame_extent`;
exact for s <= size_divisibility, and what P6, a stride-2 subsampling of P5, covers). The model keeps each image
inside its frame at every level:
- activations outside the frame are zeroed before every spatial convolution and max pool (`mask_to_frame`), which
  is the zero padding the reference frameworks apply at the frame's edge;
- RoIAlign clamps its samples to the frame's extent, not the canvas's;
- anchors outside the frame take no part in the RPN's top-k, NMS or training (`ops.anchors.frame_anchors`).

With these, an image's features, proposals and detections are those of the image alone on its own frame, whatever
canvas it sits on and whatever it is batched with (tested against torchvision at COCO sizes).
"""

from __future__ import annotations

import jax.numpy as jnp


def image_frames(image_hw, size_divisibility: int):
  """(B, 2) valid (resized) image height and width, any real dtype -> (B, 2) int32 frames.

  The valid size is rounded up to a multiple of size_divisibility (>= 1; 1 leaves it as it is).
  """
  d = int(size_divisibility)
  if d < 1:
    raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
  hw = jnp.ceil(jnp.asarray(image_hw, jnp.float32)).astype(jnp.int32)
  return -(-hw // d) * d


def frame_extent(frames, stride: int):
  """(B, 2) int32 frames -> (B, 2) int32 rows and columns of a stride-`stride` feature map inside each frame."""
  return -(-jnp.asarray(frames, jnp.int32) // int(stride))


def inside_frame(frames, stride: int, map_hw):
  """(B, H, W) bool: which cells of a (H, W) feature map of stride `stride` lie inside each image's frame."""
  ext = frame_extent(frames, stride)
  rows = jnp.arange(map_hw[0], dtype=jnp.int32)[None, :, None] < ext[:, 0, None, None]
  cols = jnp.arange(map_hw[1], dtype=jnp.int32)[None, None, :] < ext[:, 1, None, None]
  return rows & cols


def mask_to_frame(x, frames, stride: int):
  """x (B, H, W, C) at stride `stride`, zero outside each image's frame; x itself when frames is None (the whole
  canvas is the frame, e.g. a caller that feeds one image per canvas of its own size)."""
  if frames is None:
    return x
  keep = inside_frame(frames, stride, x.shape[1:3])
  return jnp.where(keep[..., None], x, jnp.zeros((), x.dtype))
