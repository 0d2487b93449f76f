"""Test-time image transforms on the host: resize (shortest edge, capped longest edge), normalize, pad to the canvas.

Two resize conventions exist because converted weights must see their inputs the way their home framework made them:

  * "torchvision" (`GeneralizedRCNNTransform`): the image is a float tensor in [0, 1]; it is normalized first, then
    resized with `F.interpolate(mode="bilinear", scale_factor=s, recompute_scale_factor=True, align_corners=False)`
    where s = min(min_size / short_edge, max_size / long_edge), so the new size is floor(size * s).
  * "detectron2" (`ResizeShortestEdge` + the model's own normalization): the uint8 image is resized with PIL's
    bilinear filter to sizes rounded to the nearest integer, then normalized inside the model.

Both pad the normalized image with zeros at the bottom and right, to the batch's largest image rounded up to 32. We
pad to the smallest of the config's few static canvases (`input.canvases`) that holds the image (`choose_canvas`),
so that each canvas is one compiled program; the model keeps every image inside its own frame (`ops.frames`), so
the canvas changes nothing in the results.

Images are (H, W, 3) RGB numpy arrays, either uint8 in 0..255 or float in [0, 1] (what torchvision models take).
Nothing here needs JAX.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

RESIZE_MODES = ("torchvision", "detectron2")
PIXEL_FORMATS = ("RGB", "BGR")

# Layout of `image_info` (docs/design.md, the image_info row: valid h, w, scale h, w, original h, w); the model and
# the Predictor index it by these names.
INFO_VALID_H, INFO_VALID_W, INFO_SCALE_H, INFO_SCALE_W, INFO_ORIG_H, INFO_ORIG_W = range(6)
IMAGE_INFO_SIZE = 6


def check_image(image, name: str = "image") -> np.ndarray:
  """Validate one input image and return it as uint8 or float32.

  image: (H, W, 3) RGB, uint8 in 0..255 or floating point in [0, 1] (float16/64 are cast to float32).
  name: how errors refer to the image (e.g. "image 3").
  Returns the (H, W, 3) array, uint8 or float32. Raises TypeError for a wrong dtype and ValueError for a wrong
  shape, an empty image, non-finite values, or float values outside [0, 1] (the usual mistake: 0..255 floats).
  """
  if not isinstance(image, np.ndarray):
    try:
      image = np.asarray(image)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot read is a type error for the caller
      raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}") from e
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"{name} must be an (H, W, 3) RGB array, got shape {image.shape}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"{name} is empty: shape {image.shape}")
  if image.dtype == np.uint8:
    return image
  if not np.issubdtype(image.dtype, np.floating):
    raise TypeError(f"{name} has dtype {image.dtype}; expected uint8 (0..255) or float in [0, 1]")
  image = image.astype(np.float32, copy=False)
  if not np.isfinite(image).all():
    raise ValueError(f"{name} has non-finite values (NaN or inf)")
  lo, hi = float(image.min()), float(image.max())
  if lo < 0.0 or hi > 1.0:
    raise ValueError(
        f"{name} is float with values in [{lo:g}, {hi:g}], outside [0, 1]; pass uint8 for 0..255 pixels")
  return image


def output_size(height: int, width: int, min_size: int, max_size: int, mode: str) -> tuple[int, int]:
  """Size of an image after the test-time resize: shortest edge `min_size`, longest edge at most `max_size`.

  height, width: the input size (ints >= 1). mode: "torchvision" or "detectron2".
  Returns (new_height, new_width) ints.

  * "torchvision": s = min(min_size / min(h, w), max_size / max(h, w)) in Python (float64) arithmetic, as
    `_resize_image_and_masks` computes it in eager mode, and the size F.interpolate derives from it with
    recompute_scale_factor=True: int(h * s), int(w * s) (truncation). So the short edge can land one pixel short,
    e.g. 799 instead of 800, exactly as in torchvision.
  * "detectron2": `ResizeShortestEdge.get_output_shape`: scale the short edge to min_size, then scale both down if
    the long edge exceeds max_size, and round each to the nearest integer (int(x + 0.5)).
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
  height, width = int(height), int(width)
  if height < 1 or width < 1:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if min_size <= 0 or max_size <= 0:
    raise ValueError(f"min_size and max_size must be positive, got {min_size} and {max_size}")
  if mode == "torchvision":
    scale = min(min_size / min(height, width), max_size / max(height, width))
    new_h, new_w = int(height * scale), int(width * scale)
  else:
    new_h, new_w = _detectron2_output_size(height, width, min_size, max_size)
  if new_h < 1 or new_w < 1:
    # torchvision fails inside F.interpolate here; say why instead.
    raise ValueError(f"image of size {height}x{width} resizes to {new_h}x{new_w} (min_size {min_size}, max_size "
                     f"{max_size}): its aspect ratio is too extreme")
  return new_h, new_w


def _detectron2_output_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
  """Detectron2's `ResizeShortestEdge.get_output_shape`, in Python floats like the original."""
  size = float(min_size)
  scale = size / min(height, width)
  if height < width:
    new_h, new_w = size, scale * width
  else:
    new_h, new_w = scale * height, size
  if max(new_h, new_w) > max_size:
    scale = float(max_size) / max(new_h, new_w)
    new_h *= scale
    new_w *= scale
  return int(new_h + 0.5), int(new_w + 0.5)


def _linear_axis(in_size: int, out_size: int):
  """Source indices and weights of a bilinear resize along one axis, as torch's CPU `upsample_bilinear2d` computes
  them with align_corners=False and no scale given (what recompute_scale_factor=True leaves it).

  Returns (i0, i1, w0, w1): (out_size,) int64 indices and float32 weights; output p = w0 * in[i0] + w1 * in[i1].
  float32 like the kernel: ratio = in / out, src = max(ratio * (p + 0.5) - 0.5, 0), lam = src - floor(src).
  """
  if in_size == out_size:
    # The kernel special-cases equal sizes to an exact copy.
    idx = np.arange(out_size)
    return idx, idx, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
  ratio = np.float32(in_size) / np.float32(out_size)
  # torch evaluates ratio * (p + 0.5) - 0.5 as one fused multiply-add (a single float32 rounding). The float64
  # product of a float32 and a half-integer below 2**24 is exact, so float64 arithmetic rounded once to float32 is
  # that FMA; plain float32 arithmetic would round twice and move weights by up to an ulp of the index (3e-5 at 512).
  src = (np.float64(ratio) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
  i1 = i0 + (i0 < in_size - 1)
  return i0, i1, np.float32(1.0) - lam, lam


def _lerp(a, b, w0, w1):
  """w0 * a + w1 * b in float32, rounded as torch's kernel does it: fma(a, w0, b * w1).

  The product of two float32 numbers is exact in float64, so adding it to the rounded b * w1 in float64 and
  rounding once to float32 is the fused multiply-add. Plain float32 arithmetic differs from torch by 1 ulp on about
  a quarter of the pixels.
  """
  return (np.float64(b * w1) + np.float64(a) * np.float64(w0)).astype(np.float32)


def _bilinear_resize(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """(H, W, C) float32 -> (h, w, C) float32, torch's bilinear resize (align_corners=False, no antialias).

  Separable: along x first, then y, the order in which torch's CPU kernel nests its sums. With `_lerp`'s rounding
  this has matched torch's x86 CPU kernel bit for bit when enlarging (the usual case, e.g. COCO's 480x640 -> 800)
  and to about 1 ulp when shrinking; tests hold it to 1e-6.
  """
  new_h, new_w = size_hw
  x0, x1, wx0, wx1 = _linear_axis(image.shape[1], new_w)
  y0, y1, wy0, wy1 = _linear_axis(image.shape[0], new_h)
  rows = _lerp(image[:, x0, :], image[:, x1, :], wx0[None, :, None], wx1[None, :, None])
  return _lerp(rows[y0], rows[y1], wy0[:, None, None], wy1[:, None, None])


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Float image in [0, 1] -> uint8: round(clip(x, 0, 1) * 255).

  Rounding to nearest makes the conversion exact for a float image that came from a uint8 one divided by 255, so
  a user passing either form of the same picture gets the same detections.
  """
  return np.rint(np.clip(image, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def resize_image(image, size_hw: Sequence[int], mode: str) -> np.ndarray:
  """Resize an image to `size_hw` = (height, width) the way `mode`'s framework does at test time.

  image: (H, W, C) numpy.
  * "torchvision": bilinear, align_corners=False, no antialiasing, in float32 — exactly
    `F.interpolate(x, scale_factor=s, mode="bilinear", recompute_scale_factor=True, align_corners=False)` whose
    output size is `size_hw`. uint8 input is first mapped to [0, 1] (x / 255, as torchvision's `to_tensor`); float
    input is resampled as it is, whatever its range (`preprocess` passes the already normalized image).
    Returns (h, w, C) float32.
  * "detectron2": PIL `Image.resize((w, h), Image.BILINEAR)` on uint8, as Detectron2's `ResizeTransform` does for
    uint8 images (the images its weights were trained and evaluated on). Float input in [0, 1] is converted with
    `to_uint8` first (nearest rounding), rather than taking Detectron2's float path (F.interpolate), so that the
    resampling filter — PIL's, which antialiases when shrinking — is the one the weights know. C must be 3.
    Returns (h, w, 3) uint8.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
  new_h, new_w = (int(s) for s in size_hw)
  if new_h < 1 or new_w < 1:
    raise ValueError(f"output size must be positive, got {new_h}x{new_w}")
  if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
    raise TypeError(f"image has dtype {image.dtype}; expected uint8 or float")

  if mode == "torchvision":
    if image.dtype == np.uint8:
      image = image.astype(np.float32) / np.float32(255.0)
    return _bilinear_resize(image.astype(np.float32, copy=False), (new_h, new_w))

  if image.shape[2] != 3:
    raise ValueError(f"detectron2 resize takes (H, W, 3) images, got shape {image.shape}")
  if image.dtype != np.uint8:
    image = to_uint8(image)
  resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
  return np.asarray(resized)


def normalize_image(image, pixel_format: str, pixel_scale: float, pixel_mean: Sequence[float],
                    pixel_std: Sequence[float]) -> np.ndarray:
  """Convert an RGB image to the model's input format and normalize it.

  image: (H, W, 3) RGB, uint8 (0..255) or float (0..1, any values accepted: it may be resampled already).
  pixel_format: "RGB" or "BGR", the channel order the weights expect; pixel_mean, pixel_std: 3 values each, in
  that order. pixel_scale: the value that white (1.0) takes before normalization (1 for torchvision weights, 255
  for Detectron2's MSRA weights).
  Returns (H, W, 3) float32: (reorder(x01 * pixel_scale) - mean) / std.

  uint8 is computed as u * pixel_scale / 255: exactly u / 255 for scale 1 (torchvision's `to_tensor`) and exactly
  u for scale 255 (Detectron2 feeds the uint8 values themselves).
  """
  if pixel_format not in PIXEL_FORMATS:
    raise ValueError(f"pixel_format must be one of {PIXEL_FORMATS}, got {pixel_format!r}")
  mean = np.asarray(pixel_mean, np.float32).reshape(-1)
  std = np.asarray(pixel_std, np.float32).reshape(-1)
  if mean.shape != (3,) or std.shape != (3,):
    raise ValueError(f"pixel_mean and pixel_std need 3 values each, got {list(mean)} and {list(std)}")
  if not (std != 0).all():
    raise ValueError(f"pixel_std must be nonzero, got {list(std)}")
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
  scale = np.float32(pixel_scale)
  if image.dtype == np.uint8:
    values = image.astype(np.float32) * scale / np.float32(255.0)
  elif np.issubdtype(image.dtype, np.floating):
    values = image.astype(np.float32, copy=False) * scale
  else:
    raise TypeError(f"image has dtype {image.dtype}; expected uint8 or float")
  if pixel_format == "BGR":
    values = values[..., ::-1]
  return ((values - mean) / std).astype(np.float32, copy=False)


def pad_to_canvas(image, canvas_hw: Sequence[int]) -> np.ndarray:
  """Zero-pad an image at the bottom and right to the canvas size.

  image: (h, w, C) numpy, any dtype. canvas_hw: (canvas_h, canvas_w).
  Returns (canvas_h, canvas_w, C) of the image's dtype, the image in the top-left corner. Raises ValueError naming
  both sizes when the image is larger than the canvas along either axis.
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"image must be (h, w, C), got shape {image.shape}")
  canvas_h, canvas_w = (int(s) for s in canvas_hw)
  height, width = image.shape[:2]
  if height > canvas_h or width > canvas_w:
    raise ValueError(f"image of size {height}x{width} (HxW) does not fit the canvas {canvas_h}x{canvas_w}")
  canvas = np.zeros((canvas_h, canvas_w, image.shape[2]), image.dtype)
  canvas[:height, :width] = image
  return canvas


def canvases(input_cfg) -> list[tuple[int, int]]:
  """The config's static canvases, `input.canvases`, as (height, width) int pairs, validated."""
  values = input_cfg.canvases
  try:
    out = [(int(h), int(w)) for h, w in values]
  except (TypeError, ValueError):
    raise ValueError(f"input.canvases must be a sequence of (height, width) pairs, got {values!r}") from None
  if not out or any(h < 1 or w < 1 for h, w in out):
    raise ValueError(f"input.canvases must name at least one canvas of positive size, got {values!r}")
  return out


def choose_canvas(size_hw: Sequence[int], canvas_list: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The canvas an image of (resized) size `size_hw` is padded to: the smallest by area that holds it, the first
  listed on a tie (Detectron2's AspectRatioGroupedDataset groups by orientation; this groups by the canvas).

  Raises ValueError naming the size and the canvases when none holds it.
  """
  h, w = (int(s) for s in size_hw)
  fits = [(int(ch) * int(cw), i) for i, (ch, cw) in enumerate(canvas_list) if h <= int(ch) and w <= int(cw)]
  if not fits:
    listed = ", ".join(f"{int(ch)}x{int(cw)}" for ch, cw in canvas_list)
    raise ValueError(f"an image resized to {h}x{w} (HxW) fits none of the canvases {listed} (input.canvases)")
  ch, cw = canvas_list[min(fits)[1]]
  return int(ch), int(cw)


def eval_size(height: int, width: int, input_cfg) -> tuple[int, int]:
  """(height, width) of an image of that size after the test-time resize of `input_cfg`."""
  return output_size(height, width, input_cfg.min_size_test, input_cfg.max_size_test, input_cfg.resize_mode)


def eval_canvas(height: int, width: int, input_cfg) -> tuple[int, int]:
  """The canvas an image of original size (height, width) is evaluated on (`choose_canvas` of its test size)."""
  return choose_canvas(eval_size(height, width, input_cfg), canvases(input_cfg))


def train_canvas(height: int, width: int, input_cfg) -> tuple[int, int]:
  """The canvas an image of original size (height, width) is trained on: the one that holds it at the largest
  training scale (max of min_size_train), hence at every scale drawn; it depends on the image alone, so that
  batches can be grouped by canvas before any image is read."""
  size = output_size(height, width, int(np.max(input_cfg.min_size_train)), input_cfg.max_size_train,
                     input_cfg.resize_mode)
  return choose_canvas(size, canvases(input_cfg))


def resize_and_normalize(image, size_hw: Sequence[int], input_cfg) -> np.ndarray:
  """(H, W, 3) RGB (uint8, or float in [0, 1]) -> (h, w, 3) float32, resized to size_hw and normalized with
  input_cfg's pixel_format, pixel_scale, pixel_mean and pixel_std, in the order of input_cfg.resize_mode's framework
  (see `preprocess`; the training examples use the same order)."""
  mode = input_cfg.resize_mode
  norm = dict(pixel_format=input_cfg.pixel_format, pixel_scale=input_cfg.pixel_scale,
              pixel_mean=input_cfg.pixel_mean, pixel_std=input_cfg.pixel_std)
  if mode == "torchvision":
    return resize_image(normalize_image(image, **norm), size_hw, mode)
  return normalize_image(resize_image(image, size_hw, mode), **norm)


def preprocess(image, input_cfg, canvas_hw: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Test-time input of one image: resize, normalize and pad, in the order of the config's framework.

  image: (H, W, 3) RGB, uint8 in 0..255 or float in [0, 1].
  input_cfg: ConfigDict-like with pixel_format, pixel_scale, pixel_mean, pixel_std, resize_mode ("torchvision" |
    "detectron2"), min_size_test, max_size_test, canvases.
  canvas_hw: the canvas to pad to; None: the smallest of input_cfg.canvases that holds the image (`choose_canvas`).
  Returns:
    canvas: (canvas_h, canvas_w, 3) float32, the normalized resized image at the top left, zeros elsewhere.
    image_info: (6,) float32 [valid_h, valid_w, scale_h, scale_w, orig_h, orig_w], with scale = resized / original
      per axis (the ratios that map boxes back, as torchvision's `resize_boxes`).

  torchvision normalizes the float image and then resizes it (GeneralizedRCNNTransform); Detectron2 resizes the
  uint8 image and then normalizes it (in the model). Bilinear resampling is linear, but rounding (float32, and
  uint8 for PIL) is not, so the order is kept as each framework has it.
  """
  image = check_image(image)
  mode = input_cfg.resize_mode
  height, width = image.shape[:2]
  new_h, new_w = output_size(height, width, input_cfg.min_size_test, input_cfg.max_size_test, mode)
  resized = resize_and_normalize(image, (new_h, new_w), input_cfg)
  if canvas_hw is None:
    canvas_hw = choose_canvas((new_h, new_w), canvases(input_cfg))
  canvas = pad_to_canvas(resized, canvas_hw)
  info = np.array([new_h, new_w, new_h / height, new_w / width, height, width], np.float32)
  return canvas, info
