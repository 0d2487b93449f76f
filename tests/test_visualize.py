"""Overlays checked pixel by pixel: what changes (mask interiors, box edges, labels, keypoints) and what does not."""

import os

import numpy as np
import pytest
from PIL import Image

from mrcnn_jax import visualize

H, W = 96, 128
GREY = 100


def _grey(h=H, w=W):
  return np.full((h, w, 3), GREY, np.uint8)


def _rect_mask(x1, y1, x2, y2, h=H, w=W):
  mask = np.zeros((h, w), bool)
  mask[y1:y2, x1:x2] = True
  return mask


def _distance_to_color(pixels, color):
  return np.abs(pixels.astype(np.int32) - np.asarray(color, np.int32)).sum(axis=-1)


# --------------------------------------------------------------------------------------------------------------------
# draw_instances
# --------------------------------------------------------------------------------------------------------------------


def test_mask_interior_moves_toward_the_class_colour_and_the_rest_is_unchanged():
  image = _grey()
  box = np.array([[40, 40, 80, 80]], np.float32)
  mask = _rect_mask(45, 50, 75, 70)[None]
  out = visualize.draw_instances(image, box, [2], [0.9], masks=mask, alpha=0.5)
  color = visualize.class_color(2)

  assert out.dtype == np.uint8 and out.shape == (H, W, 3)
  # Strictly inside the mask (off its 1-px outline): the 50/50 blend of grey and the class colour.
  interior = out[51:69, 46:74]
  expected = np.rint(0.5 * GREY + 0.5 * np.asarray(color, np.float64)).astype(np.uint8)
  assert (interior == expected).all()
  assert (_distance_to_color(interior, color) < _distance_to_color(image[51:69, 46:74], color)).all()
  # The outline: the mask's boundary pixels in the full class colour.
  assert (out[50, 45:75] == color).all() and (out[69, 45:75] == color).all()
  assert (out[50:70, 45] == color).all() and (out[50:70, 74] == color).all()
  # Outside the box and its label tab (which sits above the box's top-left corner) nothing changed.
  untouched = np.ones((H, W), bool)
  untouched[:81, 30:81] = False  # box rows 40..79 plus the label tab above it ...
  untouched[:40, 30:110] = False  # ... which may be wider than the box
  np.testing.assert_array_equal(out[untouched], image[untouched])
  # Between the box edge and the mask: not part of any mask, so unchanged too.
  np.testing.assert_array_equal(out[42:48, 42:44], image[42:48, 42:44])


def test_box_edges_have_the_box_colour():
  image = _grey()
  out = visualize.draw_instances(image, np.array([[20.0, 30.0, 60.0, 70.0]]), [1], [0.8])
  color = visualize.class_color(1)
  # XYXY [20, 30, 60, 70] covers pixel columns 20..59 and rows 30..69; the outline is on those outer pixels.
  assert (out[30:70, 20] == color).all() and (out[30:70, 59] == color).all()
  assert (out[69, 20:60] == color).all()
  # Just outside the box (right and below) nothing is drawn; inside neither, with no mask.
  np.testing.assert_array_equal(out[30:70, 60], image[30:70, 60])
  np.testing.assert_array_equal(out[70, 20:60], image[70, 20:60])
  np.testing.assert_array_equal(out[40:60, 25:55], image[40:60, 25:55])


def test_label_text_is_drawn_at_the_box_top_left():
  image = _grey()
  box = np.array([[30.0, 40.0, 90.0, 80.0]])
  with_label = visualize.draw_instances(image, box, [1], [0.97], class_names=["background", "circle"])
  # The tab sits just above the box's top-left corner: the class colour, with the text (anti-aliased, so any
  # shade between the tab colour and black or white) on it.
  tab = with_label[25:40, 30:60]
  color = np.asarray(visualize.class_color(1))
  assert (tab == color).all(axis=-1).sum() > 50
  text_pixels = ~(tab == color).all(axis=-1) & ~(tab == GREY).all(axis=-1)
  assert text_pixels.sum() > 10
  # A different text changes those pixels: it is the label that is drawn there.
  other = visualize.draw_instances(image, box, [1], [0.12], class_names=["background", "a much longer name"])
  assert (other[25:40, 30:90] != with_label[25:40, 30:90]).any()


def test_label_goes_inside_a_box_at_the_top_of_the_image():
  image = _grey()
  out = visualize.draw_instances(image, np.array([[10.0, 0.0, 70.0, 50.0]]), [3], [0.5])
  assert (out[1:10, 11:40] != GREY).any()


def test_label_names_and_fallback():
  assert visualize.class_name(2, ["background", "circle", "square"]) == "square"
  assert visualize.class_name(7, ["background", "circle"]) == "class 7"
  assert visualize.class_name(7, {7: "dog"}) == "dog"
  assert visualize.class_name(3, None) == "class 3"


def test_two_classes_get_different_colours_and_the_palette_is_fixed():
  colors = [visualize.class_color(c) for c in range(1, 81)]
  assert len(set(colors[:20])) == 20
  assert visualize.class_color(1) != visualize.class_color(2)
  assert visualize.class_color(5) == visualize.class_color(5 + len(visualize.PALETTE))

  image = _grey()
  boxes = np.array([[10, 10, 50, 50], [70, 40, 110, 80]], np.float32)
  masks = np.stack([_rect_mask(10, 10, 50, 50), _rect_mask(70, 40, 110, 80)])
  out = visualize.draw_instances(image, boxes, [1, 2], [0.9, 0.9], masks=masks)
  assert (out[30, 30] != out[60, 90]).any()
  assert tuple(out[49, 30]) == visualize.class_color(1) and tuple(out[79, 90]) == visualize.class_color(2)


def test_keypoint_dots_and_skeleton():
  image = _grey()
  keypoints = np.zeros((1, 17, 3), np.float32)
  keypoints[0, :, 2] = 1.0
  keypoints[0, :, 0] = np.linspace(20, 100, 17)
  keypoints[0, :, 1] = 48
  keypoints[0, 5] = [30, 20, 1.0]   # left shoulder ...
  keypoints[0, 6] = [90, 20, 1.0]   # ... joined to the right shoulder by the COCO skeleton
  keypoints[0, 16] = [64, 85, 0.0]  # below the threshold: not drawn
  box = np.array([[5.0, 5.0, 120.0, 90.0]])
  out = visualize.draw_instances(image, box, [1], [0.9], keypoints=keypoints)

  for x, y, s in keypoints[0]:
    if s > 0:
      assert (out[int(y), int(x)] != GREY).any(), (x, y)
  assert (out[85, 62:67] == GREY).all()  # the invisible keypoint
  assert (out[20, 45:75] != GREY).any(axis=-1).all()  # the shoulder-to-shoulder line

  # No skeleton: the line between the shoulders is gone, the dots stay.
  bare = visualize.draw_instances(image, box, [1], [0.9], keypoints=keypoints, keypoint_skeleton=())
  assert (bare[20, 45:75] == GREY).all()
  assert (bare[20, 30] != GREY).any()


def test_score_threshold_hides_low_scores():
  image = _grey()
  boxes = np.array([[10, 10, 50, 50], [70, 40, 110, 80]], np.float32)
  out = visualize.draw_instances(image, boxes, [1, 2], [0.9, 0.3], score_threshold=0.5)
  assert tuple(out[30, 10]) == visualize.class_color(1)
  np.testing.assert_array_equal(out[40:81, 70:111], image[40:81, 70:111])


def test_float_image_input_not_modified_and_no_instances():
  rng = np.random.default_rng(0)
  image = rng.random((H, W, 3)).astype(np.float32)
  before = image.copy()
  boxes = np.array([[10, 10, 50, 50]], np.float32)
  out = visualize.draw_instances(image, boxes, [1], [0.9], masks=_rect_mask(10, 10, 50, 50)[None])
  np.testing.assert_array_equal(image, before)
  assert out.dtype == np.uint8 and out.shape == (H, W, 3)
  np.testing.assert_array_equal(out[60:, 60:], np.rint(image[60:, 60:] * 255).astype(np.uint8))

  uint8_image = _grey()
  masks = _rect_mask(10, 10, 50, 50)[None]
  masks_before = masks.copy()
  visualize.draw_instances(uint8_image, boxes, [1], [0.9], masks=masks)
  assert (uint8_image == GREY).all()
  np.testing.assert_array_equal(masks, masks_before)

  empty = visualize.draw_instances(uint8_image, np.zeros((0, 4)), np.zeros((0,), np.int32), np.zeros((0,)),
                                   masks=np.zeros((0, H, W), bool), keypoints=np.zeros((0, 17, 3)))
  np.testing.assert_array_equal(empty, uint8_image)
  assert empty is not uint8_image


@pytest.mark.parametrize("kwargs, name", [
    ({"boxes": np.zeros((2, 5))}, "boxes"),
    ({"classes": np.array([1, 2, 3])}, "classes"),
    ({"scores": np.array([0.5])}, "scores"),
    ({"masks": np.zeros((2, H, W + 1), bool)}, "masks"),
    ({"keypoints": np.zeros((2, 17, 2))}, "keypoints"),
    ({"image": np.zeros((H, W), np.uint8)}, "image"),
    ({"image": np.full((H, W, 3), 255.0, np.float32)}, "image"),
])
def test_bad_shapes_raise_naming_the_argument(kwargs, name):
  args = {"image": _grey(), "boxes": np.array([[1, 1, 5, 5], [2, 2, 9, 9]], np.float32),
          "classes": np.array([1, 2]), "scores": np.array([0.5, 0.7])}
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=name):
    visualize.draw_instances(**args)


# --------------------------------------------------------------------------------------------------------------------
# make_grid and save_image
# --------------------------------------------------------------------------------------------------------------------


def test_make_grid_tiles_row_by_row():
  a = np.full((10, 20, 3), 10, np.uint8)
  b = np.full((12, 8, 3), 20, np.uint8)
  c = np.full((5, 5, 3), 1.0, np.float32)
  grid = visualize.make_grid([a, b, c], cols=2, padding=1, fill=(0, 0, 0))
  # Cells are 12 x 20 (the largest sizes); 2 rows, 2 columns, 1 px of padding around and between.
  assert grid.shape == (2 * 13 + 1, 2 * 21 + 1, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[1:11, 1:21], a)
  np.testing.assert_array_equal(grid[1:13, 22:30], b)
  np.testing.assert_array_equal(grid[14:19, 1:6], 255)
  assert (grid[0] == 0).all() and (grid[14:19, 6:21] == 0).all()
  with pytest.raises(ValueError, match="cols"):
    visualize.make_grid([a], cols=0)
  with pytest.raises(ValueError, match="images"):
    visualize.make_grid([], cols=2)


def test_save_image_writes_atomically(tmp_path, monkeypatch):
  image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
  path = visualize.save_image(tmp_path / "out.png", image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  assert sorted(os.listdir(tmp_path)) == ["out.png"]

  # A failure while writing leaves the previous file and no temporary file behind.
  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(Image.Image, "save", fail)
  with pytest.raises(OSError, match="disk full"):
    visualize.save_image(tmp_path / "out.png", np.zeros((4, 4, 3), np.uint8))
  monkeypatch.undo()
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), image)
  assert sorted(os.listdir(tmp_path)) == ["out.png"]
  with pytest.raises(ValueError, match="suffix"):
    visualize.save_image(tmp_path / "out.unknown", image)
