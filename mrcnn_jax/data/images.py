"""Image files -> (H, W, 3) uint8 RGB: `read_image`, the one decoder of training, evaluation and prediction.

The COCO and tfds sources (`coco.CocoSource.load_image`, `tfds_coco.TfdsSource.load_image`) and `mrcnn_jax.predict`
all decode through it, so a file reads the same everywhere. PIL opens the file; its mode decides the conversion
(`_to_rgb8`): 8-bit modes become RGB, alpha is dropped, 16-bit samples keep their high byte, 32-bit integer and
float pixels are refused. Every error names the file.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def read_image(path, expected_hw: tuple[int, int] | None = None, *, data: bytes | None = None) -> np.ndarray:
  """Decode an image file (or its encoded bytes, `data`, with `path` naming it in messages) to (H, W, 3) uint8 RGB.

  The one decoder of training, evaluation and prediction (the COCO and tfds sources, `mrcnn_jax.predict`), so a
  file reads the same everywhere. By PIL mode:
    RGB, L, P (palette), 1, CMYK, YCbCr, ...   converted to RGB by PIL; grey levels repeated over the channels;
    RGBA, LA, PA, RGBa, La                     alpha dropped (not composited over a background);
    16-bit samples                             scaled to 8 bits over the full 16-bit range by their high byte,
                                               value >> 8 (what PIL itself does with 48-bit RGB PNGs, whose mode is
                                               RGB): 0 -> 0, 65535 -> 255, and an 8-bit image widened by v * 257
                                               reads back exactly. 16-bit grayscale opens as I;16 (PNG, TIFF), or as
                                               I with 16-bit raw data (PGM);
    I (32-bit integers), F (32-bit floats)     refused: they have no standard range to map to 8 bits (PIL's own
                                               conversion clips everything above 255 to white).
  The EXIF orientation is not applied: COCO's annotations refer to the stored pixel grid, as pycocotools and
  torchvision read it. expected_hw: (height, width) from the annotation file; a decoded image of another size means
  the annotations do not belong to it, so it is an error.
  Raises FileNotFoundError for a missing file, IsADirectoryError for a directory, and ValueError for undecodable or
  truncated data, an unsupported pixel format, or a wrong size; every message names the file.
  """
  path = os.fspath(path)
  try:
    with Image.open(path if data is None else io.BytesIO(data)) as img:
      sixteen_bit = _has_16_bit_samples(img)  # from the decoder's raw mode: known only before load()
      img.load()  # decode now: a truncated file fails here, not later inside np.asarray
      array = _to_rgb8(img, sixteen_bit, path)
  except FileNotFoundError:
    raise FileNotFoundError(f"image file not found: {path}") from None
  except IsADirectoryError:
    raise IsADirectoryError(f"{path} is a directory, not an image file") from None
  # PIL signals a bad file with UnidentifiedImageError / OSError (truncated data), SyntaxError (some decoders),
  # ValueError or DecompressionBombError (absurd sizes); all mean "this file is not a usable image".
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    if isinstance(e, _UnsupportedImage):
      raise ValueError(str(e)) from None
    raise ValueError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e
  if expected_hw is not None and tuple(array.shape[:2]) != tuple(expected_hw):
    raise ValueError(f"image file {path} decodes to height x width {array.shape[0]} x {array.shape[1]}, but the "
                     f"annotation file says {expected_hw[0]} x {expected_hw[1]}")
  return array


class _UnsupportedImage(ValueError):
  """A decodable image whose pixel format `read_image` refuses (its message is the whole story)."""


def _has_16_bit_samples(img: Image.Image) -> bool:
  """Whether PIL decodes `img` from 16-bit samples: its mode says so (I;16...), or its raw mode does (mode I over
  I;16 data, as PIL opens 16-bit PGM files). Call before `load()`, which empties `tile`."""
  if img.mode.startswith("I;16"):
    return True
  for tile in getattr(img, "tile", None) or ():
    args = getattr(tile, "args", None)
    rawmode = args[0] if isinstance(args, tuple) and args else args
    if isinstance(rawmode, str) and rawmode.startswith("I;16"):
      return True
  return False


def _to_rgb8(img: Image.Image, sixteen_bit: bool, path: str) -> np.ndarray:
  """A loaded PIL image -> (H, W, 3) uint8 RGB (the conventions of `read_image`)."""
  if img.mode == "RGB":
    return np.asarray(img, dtype=np.uint8)
  if img.mode in ("I", "F") or img.mode.startswith("I;"):
    if not sixteen_bit:
      kind = "32-bit float" if img.mode == "F" else "32-bit integer"
      raise _UnsupportedImage(
          f"image file {path} has {kind} pixels (PIL mode {img.mode}), which have no standard range to map to 8 "
          f"bits; save it with 8 or 16 bits per channel")
    samples = np.asarray(img).astype(np.int64)  # any byte order; "I" holds the 16-bit values in 32-bit integers
    if samples.min() < 0 or samples.max() > 0xFFFF:  # cannot happen for 16-bit raw data; kept so nothing wraps
      raise _UnsupportedImage(f"image file {path}: 16-bit pixels outside 0..65535")
    gray = (samples >> 8).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
  return np.asarray(img.convert("RGB"), dtype=np.uint8)
