"""Overlays, group panels and label PNGs are written as openable PNGs with the right content."""
import numpy as np
from PIL import Image

from mixreorg_jax import visualize


def _scene():
  image = np.full((32, 40, 3), 120, np.uint8)
  label = np.zeros((32, 40), np.uint8)
  label[4:16, 6:20] = 2
  label[20:, :] = 255
  return image, label


def test_save_label_png_round_trips_ids(tmp_path):
  _, label = _scene()
  path = tmp_path / "2007_000033.png"
  visualize.save_label_png(str(path), label)
  with Image.open(path) as im:
    assert im.mode == "P"
    np.testing.assert_array_equal(np.asarray(im), label)
    assert tuple(im.getpalette()[2 * 3:2 * 3 + 3]) == tuple(visualize.palette()[2])


def test_overlay_paints_classes_and_adds_legend(tmp_path):
  image, label = _scene()
  picture = visualize.overlay(image, label, ["background", "dog", "cat"], min_side=1)
  assert picture.height >= 32 and picture.width > 40  # the legend column.
  pixels = np.asarray(picture)
  np.testing.assert_array_equal(pixels[25, 10], image[25, 10])  # ignore pixels are not painted.
  assert not np.array_equal(pixels[10, 10], image[10, 10])  # class 2 is.
  picture.save(tmp_path / "overlay.png")
  with Image.open(tmp_path / "overlay.png") as im:
    assert im.size == picture.size


def test_groups_panel_and_side_by_side(tmp_path):
  image, _ = _scene()
  groups = np.zeros((32, 40), np.int32)
  groups[:, 20:] = 1
  panel = visualize.groups_panel(image, groups, min_side=1)
  pixels = np.asarray(panel)
  assert (pixels[:, 19] == 0).all()  # the boundary between the two groups is drawn black.
  assert not np.array_equal(pixels[5, 5], pixels[5, 30])
  both = visualize.side_by_side([panel, image], titles=["groups", "image"])
  assert both.width >= 80 and both.height > 32
  both.save(tmp_path / "panels.png")
  with Image.open(tmp_path / "panels.png") as im:
    im.load()


def test_small_pictures_are_upscaled_nearest_and_the_legend_shows_the_overlay_colours():
  image, label = _scene()  # 32 x 40
  picture = np.asarray(visualize.overlay(image, label, ["background", "dog", "cat"]))
  assert picture.shape[0] == 256 and picture.shape[1] > 320  # k = 8, plus the legend column.
  painted = picture[:256, :320]
  np.testing.assert_array_equal(painted[8 * 10:8 * 10 + 8, 8 * 10:8 * 10 + 8],
                                np.broadcast_to(painted[8 * 10, 8 * 10], (8, 8, 3)))  # one source pixel, 8 x 8.
  legend = picture[:, 320:]
  for c in (0, 2):  # the classes present; each swatch holds the colour its class shows in the overlay.
    shown = painted[8 * 10 + 1, 8 * 10 + 1] if c == 2 else painted[8 * 2 + 1, 8 * 30 + 1]
    assert (np.abs(legend.reshape(-1, 3).astype(int) - shown).sum(axis=1) <= 1).any(), c
  groups = np.zeros((32, 40), np.int32)
  assert visualize.groups_panel(image, groups).size == (320, 256)
