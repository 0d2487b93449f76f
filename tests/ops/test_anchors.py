"""FPN anchors: torchvision's AnchorGenerator as the oracle for its convention, hand values for Detectron2's."""

import math

import numpy as np
import pytest

from mrcnn_jax.ops import anchors as A

STRIDES = (4, 8, 16, 32, 64)
SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = (0.5, 1.0, 2.0)
R2 = math.sqrt(2.0)


def torchvision_anchors(image_hw, sizes, ratios, feature_shapes):
  """torchvision's anchors (N, 4) for one padded image, from feature maps of the given shapes."""
  torch = pytest.importorskip("torch")
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList

  generator = AnchorGenerator(sizes, ratios)
  images = ImageList(torch.zeros(1, 3, *image_hw), [tuple(image_hw)])
  features = [torch.zeros(1, 1, h, w) for h, w in feature_shapes]
  return generator(images, features)[0].numpy()


# ---------------------------------------------------------------------------------------------- feature shapes


def test_feature_shape_halves_with_ceil():
  assert A.feature_shape((800, 1216), 4) == (200, 304)
  assert A.feature_shape((800, 1216), 64) == (13, 19)  # 800 / 64 = 12.5
  assert A.feature_shape((100, 150), 8) == (13, 19)  # 100 -> 50 -> 25 -> 13; 150 -> 75 -> 38 -> 19
  assert A.feature_shape((97, 97), 64) == (2, 2)
  assert A.feature_shape((5, 5), 1) == (5, 5)
  with pytest.raises(ValueError, match="power of two"):
    A.feature_shape((800, 800), 12)


def test_feature_shapes_match_torchvision_fpn_backbone():
  """The grid sizes are those a ResNet-FPN (with its P6 max pool) really produces, also on odd image sizes."""
  torch = pytest.importorskip("torch")
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

  backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=0).eval()
  for image_hw in [(96, 160), (100, 150), (97, 65)]:
    with torch.no_grad():
      features = backbone(torch.zeros(1, 3, *image_hw))
    shapes = [tuple(f.shape[-2:]) for f in features.values()]
    assert shapes == [A.feature_shape(image_hw, s) for s in STRIDES], image_hw


# -------------------------------------------------------------------------------------------- torchvision parity


@pytest.mark.parametrize(
    "image_hw",
    [(800, 1216), (480, 640), (800, 1344), (1344, 800), (128, 128), (96, 160)],
)
def test_torchvision_convention_matches_anchor_generator(image_hw):
  ours = A.generate_anchors(image_hw, STRIDES, SIZES, (RATIOS,) * 5, convention="torchvision")
  shapes = [A.feature_shape(image_hw, s) for s in STRIDES]
  expected = torchvision_anchors(image_hw, SIZES, (RATIOS,) * 5, shapes)
  assert [a.shape for a in ours] == [(h * w * 3, 4) for h, w in shapes]
  assert all(a.dtype == np.float32 for a in ours)
  np.testing.assert_array_equal(np.concatenate(ours), expected)


def test_torchvision_convention_p6_stride_from_image_size():
  """800 x 1216: P6 is 13 x 19, so torchvision's P6 stride is 800 // 13 = 61 vertically, 1216 // 19 = 64 across."""
  p6 = A.generate_anchors((800, 1216), STRIDES, SIZES, RATIOS, convention="torchvision")[-1]
  assert p6.shape == (13 * 19 * 3, 4)
  grid = p6.reshape(13, 19, 3, 4)
  np.testing.assert_array_equal(grid[1, 0, 1], [-256, 61 - 256, 256, 61 + 256])
  np.testing.assert_array_equal(grid[0, 1, 1], [64 - 256, -256, 64 + 256, 256])
  np.testing.assert_array_equal(grid[12, 18, 1], [18 * 64 - 256, 12 * 61 - 256, 18 * 64 + 256, 12 * 61 + 256])


def test_torchvision_convention_several_sizes_per_level():
  sizes = ((32, 40), (64, 80))
  ratios = ((0.5, 1.0, 2.0), (1.0,))
  ours = A.generate_anchors((64, 96), (4, 8), sizes, ratios, convention="torchvision")
  shapes = [(16, 24), (8, 12)]
  expected = torchvision_anchors((64, 96), sizes, ratios, shapes)
  assert [a.shape[0] for a in ours] == [16 * 24 * 6, 8 * 12 * 2]
  np.testing.assert_array_equal(np.concatenate(ours), expected)


def test_torchvision_cell_anchors_by_hand():
  """Size 32: w = 32 / sqrt(r), h = 32 * sqrt(r), halved and rounded: 45.25 / 2 -> 23, 22.63 / 2 -> 11."""
  (level,) = A.generate_anchors((4, 4), (4,), ((32,),), RATIOS, convention="torchvision")
  np.testing.assert_array_equal(level, [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])
  # Ratios outer, sizes inner.
  (level,) = A.generate_anchors((4, 4), (4,), ((32, 64),), (0.5, 1.0), convention="torchvision")
  np.testing.assert_array_equal(
      level, [[-23, -11, 23, 11], [-45, -23, 45, 23], [-16, -16, 16, 16], [-32, -32, 32, 32]]
  )


# ---------------------------------------------------------------------------------------- Detectron2 by hand


def test_detectron2_cell_anchors_by_hand():
  """Size 32, ratio r = h / w: w = sqrt(32^2 / r), h = r * w, centred and not rounded."""
  (level,) = A.generate_anchors((4, 4), (4,), ((32,),), RATIOS)
  expected = [
      [-16 * R2, -8 * R2, 16 * R2, 8 * R2],  # r = 0.5: w = 32 * sqrt(2), h = 16 * sqrt(2)
      [-16, -16, 16, 16],
      [-8 * R2, -16 * R2, 8 * R2, 16 * R2],
  ]
  assert level.shape == (3, 4) and level.dtype == np.float32
  np.testing.assert_array_equal(level, np.float32(expected))


def test_detectron2_order_sizes_outer_ratios_inner():
  (level,) = A.generate_anchors((8, 8), (8,), ((32, 64),), (0.5, 1.0, 2.0))
  cell = level[:6]
  expected = [
      [-16 * R2, -8 * R2, 16 * R2, 8 * R2],
      [-16, -16, 16, 16],
      [-8 * R2, -16 * R2, 8 * R2, 16 * R2],
      [-32 * R2, -16 * R2, 32 * R2, 16 * R2],
      [-32, -32, 32, 32],
      [-16 * R2, -32 * R2, 16 * R2, 32 * R2],
  ]
  np.testing.assert_allclose(cell, np.float32(expected), rtol=1e-7)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_detectron2_shifts_and_order(offset):
  """A 3 x 5 grid at stride 16: location-major (y outer, x inner), then the 3 cell anchors."""
  (level,) = A.generate_anchors((48, 80), (16,), ((32,),), RATIOS, offset=offset)
  assert level.shape == (3 * 5 * 3, 4)
  grid = level.reshape(3, 5, 3, 4)
  square = np.float32([-16, -16, 16, 16])
  for y in range(3):
    for x in range(5):
      cx, cy = (x + offset) * 16, (y + offset) * 16
      np.testing.assert_array_equal(grid[y, x, 1], square + [cx, cy, cx, cy])
      # Detectron2 adds float32 shifts to float32 cell anchors; so must the expectation, to compare exactly.
      wide = np.float32([-16 * R2, -8 * R2, 16 * R2, 8 * R2])
      np.testing.assert_array_equal(grid[y, x, 0], np.float32([cx, cy, cx, cy]) + wide)
  # Row-major: the second anchor location is one stride to the right of the first.
  # (Up to float32 rounding of the irrational corners.)
  np.testing.assert_allclose(level[3:6] - level[0:3], np.tile([16, 0, 16, 0], (3, 1)), atol=1e-5)
  np.testing.assert_allclose(level[15:18] - level[0:3], np.tile([0, 16, 0, 16], (3, 1)), atol=1e-5)


def test_detectron2_fpn_counts_and_configured_stride():
  levels = A.generate_anchors((800, 1216), STRIDES, SIZES, RATIOS)
  shapes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
  assert [a.shape for a in levels] == [(h * w * 3, 4) for h, w in shapes]
  # P6 keeps its configured stride of 64 in both directions (unlike torchvision's 61 on this image).
  p6 = levels[-1].reshape(13, 19, 3, 4)
  np.testing.assert_array_equal(p6[12, 18, 1], [18 * 64 - 256, 12 * 64 - 256, 18 * 64 + 256, 12 * 64 + 256])
  # Level l's square anchor has side 32 * 2**l, centred at the origin of the first cell.
  for l, level in enumerate(levels):
    half = 16 * 2**l
    np.testing.assert_array_equal(level[1], [-half, -half, half, half])


def test_conventions_agree_when_nothing_rounds():
  """Ratio 1 and strides dividing the image: both conventions give the same anchors."""
  kw = dict(image_hw=(256, 320), strides=STRIDES, sizes=SIZES, aspect_ratios=(1.0,))
  for a, b in zip(A.generate_anchors(**kw), A.generate_anchors(convention="torchvision", **kw)):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------- arguments


def test_aspect_ratio_forms_are_equivalent():
  forms = [RATIOS, list(RATIOS), (RATIOS,), (RATIOS,) * 5]
  results = [A.generate_anchors((128, 128), STRIDES, SIZES, r) for r in forms]
  for other in results[1:]:
    for a, b in zip(results[0], other):
      np.testing.assert_array_equal(a, b)


def test_feature_shapes_override():
  levels = A.generate_anchors((64, 64), (8, 16), ((32,), (64,)), RATIOS, feature_shapes=[(3, 4), (2, 2)])
  assert [a.shape for a in levels] == [(3 * 4 * 3, 4), (2 * 2 * 3, 4)]


def test_num_anchors_per_location():
  assert A.num_anchors_per_location(SIZES, RATIOS, 5) == [3] * 5
  assert A.num_anchors_per_location(((32, 64),), ((1.0,), (0.5, 2.0)), 2) == [2, 4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(convention="mmdet"), "unknown anchor convention"),
        (dict(sizes=((32,), (64,))), "sizes has 2 entries"),
        (dict(sizes=(32, 64, 128, 256, 512)), "one tuple per level"),
        (dict(aspect_ratios=((0.5,), (1.0,))), "aspect_ratios has 2 entries"),
        (dict(aspect_ratios=(0.5, (1.0,))), "mixes"),
        (dict(aspect_ratios=(0.0, 1.0)), "positive"),
        (dict(feature_shapes=[(4, 4)]), "feature_shapes"),
        (dict(offset=0.5, convention="torchvision"), "no anchor offset"),
        (dict(offset=1.0), r"\[0, 1\)"),
        (dict(image_hw=(800,)), "image_hw"),
        (dict(strides=(4, 8, 16, 32, 48)), "power of two"),
    ],
)
def test_invalid_arguments(kwargs, message):
  args = dict(image_hw=(128, 128), strides=STRIDES, sizes=SIZES, aspect_ratios=RATIOS)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    A.generate_anchors(**args)
