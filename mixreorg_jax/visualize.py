"""Pictures: coloured segmentation overlays with a legend, group panels, palette PNGs, side-by-side panels, and
the training curves of a metrics.jsonl (matplotlib).

Pure PIL/numpy. Colours come from the PASCAL VOC colour map, so a saved prediction PNG looks like the ground
truth of VOC-layout datasets; index 255 (ignore) is drawn white.
"""
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mixreorg_jax.seg_metrics import IGNORE_INDEX

MIN_SIDE = 256  # pictures are upscaled (nearest-neighbour, whole factors) until their short side has this many px.
FONT_SIZE = 14


def voc_palette() -> list:
  """The PASCAL VOC colour map as a flat 768-long PIL palette (index 255 = ignore, drawn white)."""
  palette = np.zeros((256, 3), np.uint8)
  for i in range(256):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette[i] = (r, g, b)
  palette[255] = (255, 255, 255)
  return palette.reshape(-1).tolist()


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


CURVE_KEYS = ("train/loss", "train/loss_orig", "train/loss_rest", "train/loss_seg", "train/loss_multi_label",
              "train/loss_noun_seg", "train/loss_segment_nouns", "train/loss_segment_naming", "train/seg_acc",
              "train/group_info")


def plot_training_curves(metrics_jsonl_path: str, out_png: str, keys: Sequence[str] = CURVE_KEYS,
                         evals: Optional[Dict[str, Dict[int, float]]] = None) -> str:
  """Plots the train losses and seg accuracy of a metrics.jsonl ({"step": ..., "train/loss": ...} per line)
  against the step, one panel per key present; -> out_png.

  Evaluations (the file's eval/<name>/mIoU records, plus `evals` {name: {step: mIoU}} not yet written) are marked
  by a dotted line in every panel and plotted, one line per evaluation, in a last panel of their own.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  series = {k: ([], []) for k in keys}
  evals = {name: dict(points) for name, points in (evals or {}).items()}
  with open(metrics_jsonl_path) as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      for key, value in record.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] == "mIoU" and "step" in record:
          evals.setdefault(parts[1], {}).setdefault(record["step"], value)
      for k in keys:
        if k in record and record[k] is not None and "step" in record:
          series[k][0].append(record["step"])
          series[k][1].append(record[k])
  present = [k for k in keys if series[k][0]]
  if not present:
    raise ValueError(f"{metrics_jsonl_path} has none of {list(keys)}; nothing to plot.")
  panels = len(present) + bool(evals)
  cols = min(panels, 4)
  rows = -(-panels // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharex=True)
  axes = axes.ravel()
  for ax in axes[panels:]:
    ax.axis("off")
  for ax, k in zip(axes, present):
    ax.plot(*series[k], lw=1.2)
    for step in sorted({s for points in evals.values() for s in points}):
      ax.axvline(step, color="tab:red", ls=":", lw=1)
    ax.set_title(k.split("/", 1)[-1])
    ax.set_xlabel("step")
    ax.tick_params(labelbottom=True)
    ax.grid(alpha=0.3)
  if evals:
    ax = axes[panels - 1]
    for name, points in sorted(evals.items()):
      steps = sorted(points)
      ax.plot(steps, [points[s] for s in steps], "o-", lw=1.2, label=name)
    ax.legend(fontsize=8)
    ax.set_title("eval mIoU (dotted: evaluations)")
    ax.set_xlabel("step")
    ax.tick_params(labelbottom=True)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png
