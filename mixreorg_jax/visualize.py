"""Pictures of segmentations: coloured overlays with a legend, group panels, palette PNGs, side-by-side panels.

Pure PIL/numpy. Colours come from the PASCAL VOC colour map, so a saved prediction PNG looks like the ground
truth of VOC-layout datasets; index 255 (ignore) is drawn white.
"""
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mixreorg_jax.data.synthetic import voc_palette

IGNORE_INDEX = 255
MIN_SIDE = 256  # pictures are upscaled (nearest-neighbour, whole factors) until their short side has this many px.
FONT_SIZE = 14


def palette() -> np.ndarray:
  """The VOC colour map: uint8 [256, 3] (255 = ignore = white)."""
  return np.asarray(voc_palette(), np.uint8).reshape(256, 3)


def colorize(label: np.ndarray) -> np.ndarray:
  """int [H, W] class ids in 0..255 -> uint8 [H, W, 3] colours."""
  return palette()[np.asarray(label).astype(np.uint8)]


def save_label_png(path: str, label: np.ndarray) -> None:
  """Writes int [H, W] ids (0..255) as a palette PNG: the file holds the ids, a viewer shows the VOC colours."""
  image = Image.fromarray(np.asarray(label).astype(np.uint8), mode="P")
  image.putpalette(voc_palette())
  image.save(path)


def _blend(image: np.ndarray, colours: np.ndarray, alpha: float, mask: Optional[np.ndarray] = None) -> np.ndarray:
  """image and colours uint8 [H, W, 3] mixed as (1 - alpha) * image + alpha * colours (only where mask)."""
  out = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
  if mask is not None:
    out = np.where(mask[..., None], out, image)
  return np.clip(out, 0, 255).astype(np.uint8)


def _boundaries(ids: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels whose right or lower neighbour has another id."""
  edge = np.zeros(ids.shape, bool)
  edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
  edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
  return edge


def upscale(image: np.ndarray, ids: np.ndarray, min_side: int = MIN_SIDE):
  """image [H, W, 3] and ids [H, W] repeated k x k, k the least whole factor that gives a short side >= min_side.

  Nearest-neighbour: every pixel stays one colour and every id one id (a 64 px image becomes 256 px, k = 4).
  """
  k = max(1, -(-min_side // min(ids.shape)))
  return (np.repeat(np.repeat(image, k, axis=0), k, axis=1), np.repeat(np.repeat(ids, k, axis=0), k, axis=1))


def _font() -> ImageFont.ImageFont:
  return ImageFont.load_default(size=FONT_SIZE)


def _check_pair(image: np.ndarray, ids: np.ndarray, what: str) -> None:
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != ids.shape:
    raise ValueError(f"{what}: expected image [H, W, 3] and ids [H, W], got {image.shape} and {ids.shape}.")


def overlay(image: np.ndarray, label: np.ndarray, class_names: Sequence[str], alpha: float = 0.5,
            ignore_index: int = IGNORE_INDEX, min_side: int = MIN_SIDE) -> Image.Image:
  """The image with the label map painted over it, class boundaries in black, and a legend of the classes present.

  Args:
    image: uint8 [H, W, 3].
    label: int [H, W] class ids (indices into class_names); ignore_index pixels are left unpainted.
    class_names: the name of every class id.
    min_side: the picture is upscaled (nearest-neighbour) to at least this short side; 1 keeps its size.
  Returns:
    an RGB PIL image [kH, kW + legend width] (k from `upscale`). Each legend swatch is the mean colour of its
    class's painted pixels, i.e. the colour the overlay shows, not the palette colour before blending.
  """
  image, label = np.asarray(image, np.uint8), np.asarray(label)
  _check_pair(image, label, "overlay")
  image, label = upscale(image, label, min_side)
  painted = _blend(image, colorize(label), alpha, mask=label != ignore_index)
  painted[_boundaries(label)] = 0
  present = [int(c) for c in np.unique(label) if c != ignore_index and c < len(class_names)]
  interior = ~_boundaries(label)
  swatches = [_shown_colour(painted, label == c, interior) for c in present]
  return _with_legend(Image.fromarray(painted), [(colour, class_names[c]) for colour, c in zip(swatches, present)])


def _shown_colour(painted: np.ndarray, mask: np.ndarray, interior: np.ndarray) -> np.ndarray:
  """The mean colour [3] of painted [H, W, 3] over mask [H, W], away from the black boundaries where it can be."""
  inside = mask & interior
  return painted[inside if inside.any() else mask].mean(axis=0)


def _with_legend(picture: Image.Image, entries: Sequence[tuple]) -> Image.Image:
  """picture with a white column on the right listing (colour swatch, name) entries."""
  if not entries:
    return picture
  font = _font()
  line = FONT_SIZE + 6
  text_width = max(ImageDraw.Draw(picture).textlength(name, font=font) for _, name in entries)
  width = int(text_width) + line + 12
  height = max(picture.height, line * len(entries) + 8)
  canvas = Image.new("RGB", (picture.width + width, height), (255, 255, 255))
  canvas.paste(picture, (0, 0))
  draw = ImageDraw.Draw(canvas)
  for i, (colour, name) in enumerate(entries):
    x, y = picture.width + 4, 4 + i * line
    draw.rectangle([x, y, x + line - 4, y + line - 4], fill=tuple(int(v) for v in colour), outline=(0, 0, 0))
    draw.text((x + line, y), name, fill=(0, 0, 0), font=font)
  return canvas


def groups_panel(image: np.ndarray, group_ids: np.ndarray, alpha: float = 0.6, min_side: int = MIN_SIDE) -> Image.Image:
  """The image coloured by group (each pixel's argmax group), with group boundaries drawn black.

  Args:
    image: uint8 [H, W, 3].
    group_ids: int [H, W] group index per pixel (e.g. argmax of the upsampled [H, W, G] assignment).
    min_side: the picture is upscaled (nearest-neighbour) to at least this short side; 1 keeps its size.
  Returns:
    an RGB PIL image [kH, kW] (k from `upscale`).
  """
  image, group_ids = np.asarray(image, np.uint8), np.asarray(group_ids)
  _check_pair(image, group_ids, "groups_panel")
  image, group_ids = upscale(image, group_ids, min_side)
  # Skip the VOC background colour (black) so every group is visible; ids wrap around the palette.
  colours = palette()[1 + np.asarray(group_ids, np.int64) % 254]
  painted = _blend(image, colours, alpha)
  painted[_boundaries(group_ids)] = 0
  return Image.fromarray(painted)


def side_by_side(panels: Sequence, titles: Sequence[str] = (), pad: int = 4) -> Image.Image:
  """Panels (PIL images or uint8 [H, W, 3] arrays) in one row on white, each under its title if given."""
  images = [p if isinstance(p, Image.Image) else Image.fromarray(np.asarray(p, np.uint8)) for p in panels]
  if not images:
    raise ValueError("side_by_side: no panels.")
  title_height = FONT_SIZE + 6 if titles else 0
  width = sum(im.width for im in images) + pad * (len(images) + 1)
  height = max(im.height for im in images) + title_height + 2 * pad
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  x = pad
  for i, im in enumerate(images):
    if i < len(titles):
      draw.text((x, pad), titles[i], fill=(0, 0, 0), font=_font())
    canvas.paste(im.convert("RGB"), (x, pad + title_height))
    x += im.width + pad
  return canvas
