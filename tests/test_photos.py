"""Real-world image files through `segment` and `evaluate`: sizes, EXIF rotation, modes and bit depths.

The files are made here with PIL (no third-party photos): an EXIF-rotated JPEG, greyscale, palette and RGBA PNGs,
a CMYK JPEG, a 16-bit greyscale PNG, a 1-pixel-wide image and an odd size.
"""
import os

import numpy as np
from PIL import Image
import pytest

from configs.eval import voc_layout
from mixreorg_jax import evaluate
from mixreorg_jax import inference
from mixreorg_jax import segment
from mixreorg_jax import zeroshot
from mixreorg_jax.data import seg_datasets
from mixreorg_jax.data import synthetic
from tests.test_evaluate import make_checkpoint

EXIF_ORIENTATION = 0x0112
ROTATED_90_CW = 6  # displayed = the stored pixels turned 90 degrees clockwise.


def write_photo(path, kind, rgb):
  """Writes the uint8 RGB [H, W, 3] picture `rgb` as `kind`; -> the [H, W, 3] RGB it should read back as."""
  im = Image.fromarray(rgb)
  if kind == "exif_rotated_jpeg":  # stored sideways, displayed as rgb.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1)))  # turning it clockwise gives rgb back.
    exif = stored.getexif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CW
    stored.save(path, format="JPEG", quality=95, exif=exif)
    return rgb
  if kind == "greyscale_png":
    im.convert("L").save(path, format="PNG")
    return np.asarray(im.convert("L").convert("RGB"))
  if kind == "palette_png":
    pal = im.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(path, format="PNG")
    return np.asarray(pal.convert("RGB"))
  if kind == "rgba_png":  # the left half transparent: white.
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :rgb.shape[1] // 2] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(path, format="PNG")
    expected = rgb.copy()
    expected[:, :rgb.shape[1] // 2] = 255
    return expected
  if kind == "cmyk_jpeg":
    im.convert("CMYK").save(path, format="JPEG", quality=95)
    return rgb
  if kind == "greyscale_16bit_png":
    grey = np.asarray(im.convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey).save(path, format="PNG")
    return np.asarray(im.convert("L").convert("RGB"))
  if kind in ("one_pixel_wide_png", "odd_size_png"):
    im.save(path, format="PNG")
    return rgb
  raise ValueError(kind)


# kind -> displayed (H, W)
PHOTOS = {"exif_rotated_jpeg": (40, 24), "greyscale_png": (33, 47), "palette_png": (40, 40), "rgba_png": (24, 60),
          "cmyk_jpeg": (48, 32), "greyscale_16bit_png": (30, 30), "one_pixel_wide_png": (37, 1),
          "odd_size_png": (19, 131)}
LOSSY = ("exif_rotated_jpeg", "cmyk_jpeg")


def smooth_picture(shape, seed):
  """Low-frequency colours, so that JPEG keeps them close."""
  h, w = shape
  rng = np.random.default_rng(seed)
  y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  channels = [np.clip(255 * (a * y + (1 - a) * x), 0, 255) for a in rng.uniform(0, 1, 3)]
  return np.stack(channels, -1).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  out = {}
  for i, (kind, shape) in enumerate(PHOTOS.items()):
    path = str(root / f"{kind}.{'jpg' if kind.endswith('jpeg') else 'png'}")
    out[kind] = (path, write_photo(path, kind, smooth_picture(shape, i)))
  return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.mark.parametrize("kind", sorted(PHOTOS))
def test_read_image_gives_the_displayed_rgb(photos, kind):
  path, expected = photos[kind]
  image = seg_datasets.read_image(path)
  assert image.dtype == np.uint8 and image.shape == PHOTOS[kind] + (3,)
  diff = np.abs(image.astype(int) - expected).mean()
  assert diff < (6 if kind in LOSSY else 0.5), diff


def test_unreadable_image_is_a_clear_error(tmp_path):
  (tmp_path / "notes.png").write_text("not an image")
  with pytest.raises(ValueError, match="notes.png: not a readable image"):
    seg_datasets.read_image(str(tmp_path / "notes.png"))


def test_every_photo_segments_into_a_picture(photos, checkpoint, tmp_path):
  protocol = zeroshot.Protocol(short_side=32, window=32, stride=16, with_background=True, bg_threshold=0.5)
  path, _ = photos["exif_rotated_jpeg"]  # the command's path: segment_file reads, segments and draws.
  output, result = segment.segment_file(checkpoint, path, ["circle", "square"], str(tmp_path / "exif.png"), protocol)
  assert result["labels"].shape == PHOTOS["exif_rotated_jpeg"] and os.path.isfile(output)
  model = inference.load(checkpoint)  # the rest with one model, as segment_file would read them.
  for kind, (path, _) in photos.items():
    image = seg_datasets.read_image(path)
    result = segment.segment_image(model, image, ["circle", "square"], protocol)
    assert result["labels"].shape == PHOTOS[kind], kind
    picture = segment.render(image, result)
    assert picture.mode == "RGB" and picture.height >= PHOTOS[kind][0], kind


def test_every_photo_evaluates(photos, checkpoint, tmp_path):
  """The photos as the images of a VOC-layout set (labels of their displayed size) through evaluate."""
  root = tmp_path / "voc"
  synthetic.write_voc_split(str(root), len(PHOTOS), 32, 0, "voc")
  names = sorted(os.listdir(root / "JPEGImages"))
  for name, (kind, (path, _)) in zip(names, photos.items()):
    with open(path, "rb") as src, open(root / "JPEGImages" / name, "wb") as dst:
      dst.write(src.read())  # PNG bytes under a .jpg name: read by content, as PIL does.
    label_path = root / "SegmentationClass" / name.replace(".jpg", ".png")
    with Image.open(label_path) as label:
      label.resize(PHOTOS[kind][::-1], Image.NEAREST).save(label_path)
  config = voc_layout.get_config()
  with config.unlocked():
    config.data.root, config.short_side, config.window, config.stride = str(root), 32, 32, 16
    config.num_visualizations = 0
  summary = evaluate.evaluate_checkpoint(checkpoint, config, str(tmp_path / "out"))
  assert summary["num_images"] == len(PHOTOS) and np.isfinite(summary["pixel_acc"])
