"""Test-time transforms against their oracles: torch's F.interpolate and torchvision's GeneralizedRCNNTransform,
PIL, and a transcription of Detectron2's ResizeShortestEdge.get_output_shape with hand-checked sizes."""

import types

import numpy as np
import pytest
from PIL import Image

from mrcnn_jax.data import transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Detectron2's MSRA weights: BGR in 0..255 minus the mean, std 1.
MSRA_MEAN_BGR = [103.530, 116.280, 123.675]


def _torch():
  return pytest.importorskip("torch")


def _input_cfg(mode, min_size, max_size, canvas_hw, **overrides):
  if mode == "torchvision":
    fields = dict(pixel_format="RGB", pixel_scale=1.0, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD)
  else:
    fields = dict(pixel_format="BGR", pixel_scale=255.0, pixel_mean=MSRA_MEAN_BGR, pixel_std=[1.0, 1.0, 1.0])
  fields.update(resize_mode=mode, min_size_test=min_size, max_size_test=max_size, canvases=(canvas_hw,))
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def _detectron2_output_shape(oldh, oldw, short_edge_length, max_size):
  """Transcription of Detectron2's `ResizeShortestEdge.get_output_shape` (the oracle)."""
  h, w = oldh, oldw
  size = short_edge_length * 1.0
  scale = size / min(h, w)
  if h < w:
    newh, neww = size, scale * w
  else:
    newh, neww = scale * h, size
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh = newh * scale
    neww = neww * scale
  neww = int(neww + 0.5)
  newh = int(newh + 0.5)
  return (newh, neww)


# --------------------------------------------------------------------------------------------------------------------
# Output sizes.
# --------------------------------------------------------------------------------------------------------------------

# Sizes whose short edge lands on 799 (97, 161) or whose capped long edge lands on 1332 (149, 298) in torchvision,
# because s * size truncates just below the integer; plus ordinary COCO-like sizes.
_TORCHVISION_EDGE_SIZES = [(97, 120), (161, 200), (50, 149), (100, 298), (480, 640), (640, 480), (427, 640),
                           (1000, 100), (1, 1), (2000, 3)]


def test_torchvision_output_size_matches_interpolate():
  torch = _torch()
  from torchvision.models.detection.transform import _resize_image_and_masks

  rng = np.random.default_rng(0)
  sizes = _TORCHVISION_EDGE_SIZES + [tuple(int(v) for v in rng.integers(1, 1400, size=2)) for _ in range(40)]
  truncated = 0
  for min_size, max_size in [(800, 1333), (200, 333), (640, 1000)]:
    for h, w in sizes:
      try:
        resized, _ = _resize_image_and_masks(torch.zeros(1, h, w), min_size, max_size)
      except RuntimeError:  # an edge resized to 0 px
        with pytest.raises(ValueError, match=f"size {h}x{w} resizes to .*aspect ratio"):
          transforms.output_size(h, w, min_size, max_size, "torchvision")
        continue
      expected = tuple(resized.shape[-2:])
      assert transforms.output_size(h, w, min_size, max_size, "torchvision") == expected, (h, w, min_size)
      truncated += min_size - 1 in expected or max_size - 1 in expected
  # The list above must exercise torchvision's truncation, or this test would not tell floor from round.
  assert truncated >= 4


@pytest.mark.parametrize("hw, expected", [
    ((480, 640), (800, 1067)),   # 640 * 800 / 480 = 1066.67 rounds up (torchvision truncates to 1066)
    ((640, 480), (1067, 800)),
    ((1000, 100), (1333, 133)),  # 8000 x 800 capped by 1333 / 8000: 133.3
    ((100, 1000), (133, 1333)),
    ((800, 1333), (800, 1333)),
    ((333, 500), (800, 1201)),   # 500 * 800 / 333 = 1201.2
    ((97, 120), (800, 990)),     # 120 * 800 / 97 = 989.7; the short edge is exactly 800, not torchvision's 799
])
def test_detectron2_output_size_hand_checked(hw, expected):
  assert _detectron2_output_shape(*hw, 800, 1333) == expected
  assert transforms.output_size(*hw, 800, 1333, "detectron2") == expected


def test_detectron2_output_size_matches_transcription():
  rng = np.random.default_rng(1)
  for _ in range(300):
    h, w = (int(v) for v in rng.integers(1, 3000, size=2))
    for min_size, max_size in [(800, 1333), (640, 1000), (128, 128)]:
      assert transforms.output_size(h, w, min_size, max_size, "detectron2") == _detectron2_output_shape(
          h, w, min_size, max_size), (h, w, min_size)


def test_output_size_errors():
  with pytest.raises(ValueError, match="resize mode"):
    transforms.output_size(10, 10, 800, 1333, "bicubic")
  with pytest.raises(ValueError, match="positive"):
    transforms.output_size(0, 10, 800, 1333, "torchvision")


# --------------------------------------------------------------------------------------------------------------------
# Resizing.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw, scale", [((30, 43), 2.1), ((48, 64), 800 / 480), ((13, 200), 3.3), ((97, 61), 0.37),
                                       ((50, 50), 0.999), ((7, 9), 1.0)])
def test_torchvision_resize_matches_interpolate(hw, scale):
  torch = _torch()
  image = np.random.default_rng(2).random(hw + (3,), dtype=np.float32)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(image).permute(2, 0, 1)[None], scale_factor=scale, mode="bilinear",
      recompute_scale_factor=True, align_corners=False)[0].permute(1, 2, 0).numpy()
  out = transforms.resize_image(image, expected.shape[:2], "torchvision")
  assert out.dtype == np.float32 and out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_torchvision_resize_of_uint8_is_resize_of_x_over_255():
  image = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
      transforms.resize_image(image, (33, 50), "torchvision"),
      transforms.resize_image(image.astype(np.float32) / np.float32(255), (33, 50), "torchvision"))


@pytest.mark.parametrize("size_hw", [(64, 91), (12, 17), (30, 43)])
def test_detectron2_resize_is_pil_bilinear(size_hw):
  image = np.random.default_rng(4).integers(0, 256, (30, 43, 3), dtype=np.uint8)
  expected = np.asarray(Image.fromarray(image).resize(size_hw[::-1], Image.BILINEAR))
  out = transforms.resize_image(image, size_hw, "detectron2")
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)
  # A float image made from the same uint8 one by / 255 converts back exactly and resizes the same.
  np.testing.assert_array_equal(
      transforms.resize_image(image.astype(np.float32) / 255.0, size_hw, "detectron2"), expected)


def test_resize_errors():
  with pytest.raises(ValueError, match=r"\(H, W, C\)"):
    transforms.resize_image(np.zeros((4, 4), np.uint8), (8, 8), "torchvision")
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    transforms.resize_image(np.zeros((4, 4, 4), np.uint8), (8, 8), "detectron2")
  with pytest.raises(TypeError, match="int32"):
    transforms.resize_image(np.zeros((4, 4, 3), np.int32), (8, 8), "torchvision")
  with pytest.raises(ValueError, match="resize mode"):
    transforms.resize_image(np.zeros((4, 4, 3), np.uint8), (8, 8), "nearest")


# --------------------------------------------------------------------------------------------------------------------
# Normalization and padding.
# --------------------------------------------------------------------------------------------------------------------


def test_normalize_rgb_unit_scale_is_to_tensor_then_normalize():
  image = np.random.default_rng(5).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  out = transforms.normalize_image(image, "RGB", 1.0, IMAGENET_MEAN, IMAGENET_STD)
  # torchvision: to_tensor (u / 255 in float32), then (x - mean) / std in float32.
  x = image.astype(np.float32) / np.float32(255)
  expected = (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, expected)


def test_normalize_bgr_255_uses_the_uint8_values_reordered():
  image = np.random.default_rng(6).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  out = transforms.normalize_image(image, "BGR", 255.0, MSRA_MEAN_BGR, [1.0, 2.0, 4.0])
  expected = (image[..., ::-1].astype(np.float32) - np.float32(MSRA_MEAN_BGR)) / np.float32([1.0, 2.0, 4.0])
  np.testing.assert_array_equal(out, expected)
  # Float input in [0, 1] is scaled by pixel_scale before the mean is taken.
  out_f = transforms.normalize_image(np.full((2, 2, 3), 0.5, np.float32), "BGR", 255.0, MSRA_MEAN_BGR, [1, 1, 1])
  np.testing.assert_allclose(out_f[0, 0], 127.5 - np.array(MSRA_MEAN_BGR), rtol=1e-6)


def test_normalize_errors():
  image = np.zeros((2, 2, 3), np.uint8)
  with pytest.raises(ValueError, match="pixel_format"):
    transforms.normalize_image(image, "RGBA", 1.0, IMAGENET_MEAN, IMAGENET_STD)
  with pytest.raises(ValueError, match="3 values"):
    transforms.normalize_image(image, "RGB", 1.0, [0.5], IMAGENET_STD)
  with pytest.raises(ValueError, match="nonzero"):
    transforms.normalize_image(image, "RGB", 1.0, IMAGENET_MEAN, [1.0, 0.0, 1.0])


def test_pad_to_canvas():
  image = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) + 1
  out = transforms.pad_to_canvas(image, (4, 5))
  assert out.shape == (4, 5, 2) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:2, :3], image)
  assert not out[2:].any() and not out[:, 3:].any()
  with pytest.raises(ValueError, match=r"size 6x3 .*canvas 4x5"):
    transforms.pad_to_canvas(np.zeros((6, 3, 3)), (4, 5))
  with pytest.raises(ValueError, match=r"size 2x7 .*canvas 4x5"):
    transforms.pad_to_canvas(np.zeros((2, 7, 3)), (4, 5))


# --------------------------------------------------------------------------------------------------------------------
# preprocess, end to end.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw, min_size, max_size, canvas", [
    ((480, 640), 800, 1333, (800, 1088)),
    ((600, 400), 800, 1333, (1216, 800)),
    ((37, 53), 200, 333, (224, 288)),
    ((300, 20), 200, 333, (352, 32)),   # capped by the long edge
])
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_preprocess_torchvision_matches_generalized_rcnn_transform(hw, min_size, max_size, canvas, dtype):
  torch = _torch()
  from torchvision.models.detection.transform import GeneralizedRCNNTransform

  rng = np.random.default_rng(7)
  if dtype == "uint8":
    image = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
    as_float = image.astype(np.float32) / np.float32(255)  # torchvision's to_tensor
  else:
    image = as_float = rng.random(hw + (3,), dtype=np.float32)
  transform = GeneralizedRCNNTransform(min_size, max_size, IMAGENET_MEAN, IMAGENET_STD).eval()
  with torch.no_grad():
    image_list, _ = transform([torch.from_numpy(as_float).permute(2, 0, 1)])
  expected = image_list.tensors[0].permute(1, 2, 0).numpy()
  valid_h, valid_w = image_list.image_sizes[0]

  out, info = transforms.preprocess(image, _input_cfg("torchvision", min_size, max_size, canvas))
  assert out.shape == canvas + (3,) and out.dtype == np.float32
  assert info.dtype == np.float32 and info.shape == (6,)
  np.testing.assert_array_equal(info[[0, 1, 4, 5]], [valid_h, valid_w, hw[0], hw[1]])
  np.testing.assert_allclose(info[2:4], [valid_h / hw[0], valid_w / hw[1]], rtol=1e-6)
  np.testing.assert_allclose(out[:valid_h, :valid_w], expected[:valid_h, :valid_w], rtol=0, atol=1e-5)
  assert not out[valid_h:].any() and not out[:, valid_w:].any()


def test_preprocess_detectron2_resizes_uint8_then_normalizes():
  image = np.random.default_rng(8).integers(0, 256, (48, 64, 3), dtype=np.uint8)
  cfg = _input_cfg("detectron2", 80, 100, (96, 128))
  out, info = transforms.preprocess(image, cfg)
  # Short edge to 80 gives 80 x 106.67; the long edge is capped at 100, scaling both by 0.9375: 75 x 100.
  assert transforms.output_size(48, 64, 80, 100, "detectron2") == (75, 100)
  resized = np.asarray(Image.fromarray(image).resize((100, 75), Image.BILINEAR))
  expected = resized[..., ::-1].astype(np.float32) - np.float32(MSRA_MEAN_BGR)
  np.testing.assert_array_equal(out[:75, :100], expected)
  assert not out[75:].any() and not out[:, 100:].any()
  np.testing.assert_allclose(info, [75, 100, 75 / 48, 100 / 64, 48, 64], rtol=1e-6)


def test_preprocess_canvas_too_small_names_both_sizes():
  with pytest.raises(ValueError, match=r"resized to 64x85 .*fits none of the canvases 64x64"):
    transforms.preprocess(np.zeros((30, 40, 3), np.uint8), _input_cfg("torchvision", 64, 96, (64, 64)))


def test_choose_canvas_takes_the_smallest_that_holds_the_image():
  canvases = [(800, 1344), (800, 1088), (1088, 800), (1344, 1344)]
  assert transforms.choose_canvas((800, 1066), canvases) == (800, 1088)
  assert transforms.choose_canvas((800, 1333), canvases) == (800, 1344)
  assert transforms.choose_canvas((1066, 800), canvases) == (1088, 800)
  assert transforms.choose_canvas((800, 800), canvases) == (800, 1088)  # a tie in area: the first listed
  assert transforms.choose_canvas((900, 1000), canvases) == (1344, 1344)
  with pytest.raises(ValueError, match=r"resized to 1400x10 .*fits none of the canvases 800x1344, 800x1088"):
    transforms.choose_canvas((1400, 10), canvases)


# --------------------------------------------------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image, error, message", [
    (np.zeros((4, 5), np.uint8), ValueError, r"\(H, W, 3\) RGB array, got shape \(4, 5\)"),
    (np.zeros((4, 5, 4), np.uint8), ValueError, r"got shape \(4, 5, 4\)"),
    (np.zeros((0, 5, 3), np.uint8), ValueError, "empty"),
    (np.zeros((4, 5, 3), np.int64), TypeError, "dtype int64"),
    (np.zeros((4, 5, 3), bool), TypeError, "dtype bool"),
    (np.full((4, 5, 3), np.nan, np.float32), ValueError, "non-finite"),
    (np.full((4, 5, 3), 255.0, np.float32), ValueError, r"outside \[0, 1\].*uint8"),
    (np.full((4, 5, 3), -0.1, np.float64), ValueError, r"outside \[0, 1\]"),
])
def test_bad_images_are_rejected_naming_the_problem(image, error, message):
  with pytest.raises(error, match=message) as raised:
    transforms.check_image(image, name="my image")
  assert str(raised.value).startswith("my image ")
  with pytest.raises(error, match=message):
    transforms.preprocess(image, _input_cfg("torchvision", 64, 96, (96, 96)))


def test_check_image_casts_floats_to_float32():
  out = transforms.check_image(np.full((2, 3, 3), 0.25, np.float64))
  assert out.dtype == np.float32
  image = np.zeros((2, 3, 3), np.uint8)
  assert transforms.check_image(image) is image
