"""Transcriptions of Detectron2 code, the oracle of tests where Detectron2 itself cannot be installed."""

import torch
import torch.nn.functional as F  # noqa: N812


def detectron2_paste_oracle(masks, boxes, image_hw):
  """Transcription of Detectron2's `paste_masks_in_image` on CPU (detectron2/layers/mask_ops.py), float output.

  On CPU Detectron2 pastes one mask per chunk with `_do_paste_mask(..., skip_empty=True)`, which samples the mask
  with `grid_sample` only in the region [floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1) (clipped to
  the image) and leaves the rest of the image 0.
  masks: (K, M, M) float32, boxes: (K, 4) float32 numpy. Returns (K, H, W) float32 numpy.
  """
  img_h, img_w = image_hw
  masks = torch.from_numpy(masks)[:, None]
  boxes = torch.from_numpy(boxes)
  out = torch.zeros((len(masks), img_h, img_w), dtype=torch.float32)
  for k in range(len(masks)):
    # _do_paste_mask with a chunk of one mask and skip_empty=True:
    chunk_boxes = boxes[k : k + 1]
    x0_int, y0_int = torch.clamp(chunk_boxes.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32)
    x1_int = torch.clamp(chunk_boxes[:, 2].max().ceil() + 1, max=img_w).to(dtype=torch.int32)
    y1_int = torch.clamp(chunk_boxes[:, 3].max().ceil() + 1, max=img_h).to(dtype=torch.int32)
    x0, y0, x1, y1 = torch.split(chunk_boxes, 1, dim=1)
    img_y = torch.arange(y0_int, y1_int, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    pasted = F.grid_sample(masks[k : k + 1], grid, align_corners=False)
    out[k, y0_int:y1_int, x0_int:x1_int] = pasted[0, 0]
  return out.numpy()
