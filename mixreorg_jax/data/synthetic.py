"""Synthetic shapes-and-captions data: training shards plus segmentation sets in VOC layout.

  python -m mixreorg_jax.data.synthetic --out=data/synthetic [--num_train=8000 --num_val=200 --num_test=500
      --image_size=64 --seed=0]
  python -m mixreorg_jax.data.synthetic --out=unused --spm_out=mixreorg_jax/data/assets/synthetic_spm
      (re-fits the shipped SentencePiece model to the caption generator)

writes, seeded and reproducible:
  DIR/train-0000K-of-0000N.tfrecord   tf.train.Example with jpg (JPEG bytes), txt (caption), nouns (bytes list:
                                      the objects' class names, then the background's phrase if the caption
                                      names it, e.g. "striped paper")
  DIR/voc_val/ and DIR/voc/           VOC layout: JPEGImages/*.jpg, SegmentationClass/*.png (palette PNG),
                                      ImageSets/Segmentation/val.txt, class_names.txt (line 0 = background)
  DIR/COMPLETE                        the generation arguments, written last (`ensure_synthetic_data` checks it)

Each image has 1-3 objects (a shape class, each with its own colour family) on a textured background. Captions
name the objects through varied templates with distractor words, so a tiny model learns to ground the shape
words in a few minutes on a CPU. The train split, the tuning split (voc_val) and the held-out split (voc) use
separate random streams of the same seed.
"""
import io
import json
import os
import re
from typing import Tuple

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw

from mixreorg_jax import visualize

CLASS_NAMES = ("background", "circle", "square", "triangle", "star", "cross", "ring", "diamond", "crescent")
# One colour family per class (RGB centre; each object jitters it), so colour and shape agree as in real data.
CLASS_COLOURS = {
    "circle": ("red", (220, 40, 40)), "square": ("blue", (40, 70, 220)), "triangle": ("green", (40, 180, 60)),
    "star": ("yellow", (235, 215, 40)), "cross": ("purple", (150, 50, 190)), "ring": ("orange", (245, 140, 30)),
    "diamond": ("cyan", (40, 210, 220)), "crescent": ("pink", (240, 120, 190)),
}
CAPTION_TEMPLATES = (
    "a photo of {}.", "{} on a {bg} background.", "there is {} in this picture.", "an image showing {}.",
    "my drawing of {}, {adj} and simple.", "look at {}!", "{} seen from above.", "a {adj} picture with {}.",
    "close-up of {} on {bg} paper.", "{}", "today i found {} on the {bg} table.", "a blurry snapshot of {}.",
    "a photo of {} on a {bg} background.", "{bg} background, {}.",
)
ADJECTIVES = ("nice", "small", "bright", "old", "colourful", "quick", "lovely", "plain")
# The word a caption uses for each background texture of `_texture` (stripes, checks, blobs, noise): captions that
# mention the background describe the one in the picture, as real captions describe the scene.
TEXTURE_WORDS = ("striped", "checkered", "dotted", "noisy")
# What the background is called in the templates that mention it (the word after "{bg}": background, paper,
# table), in the templates' order.
BACKGROUND_NOUNS = tuple(dict.fromkeys(re.findall(r"\{bg\} (\w+)", " ".join(CAPTION_TEMPLATES))))
# The templates that describe the background, and the rest. make_caption's scene_share < 0 (the default) draws every
# template equally often, so 5 captions in 14 describe the scene; scene_share in [0, 1] draws from SCENE_TEMPLATES
# with that probability.
SCENE_TEMPLATES = tuple(t for t in CAPTION_TEMPLATES if "{bg}" in t)
OBJECT_TEMPLATES = tuple(t for t in CAPTION_TEMPLATES if "{bg}" not in t)
DEFAULT_SCENE_SHARE = -1.0
# Bumped when the bytes written for the same arguments change, so that an older copy is regenerated.
# 2: the nouns of a training record include the background's noun phrase when its caption mentions it.
# 3: larger objects (OBJECT_RADIUS below; it was (0.14, 0.26)).
DATA_VERSION = 3
# An object's radius, as a fraction of the image size: 13-20 px at 64 px, so that an object spans 3-5 of the
# demo's 8 px patches across, as a photo's objects span several of GroupViT's 16 px patches. At (0.14, 0.26),
# 2-4 patches, the patch grid bounded mIoU at 61.8 (labelling each patch with its majority class) and the objects'
# main groups were mostly background; here the bound is 66.2 (tools/diagnose reports it).
OBJECT_RADIUS = (0.2, 0.32)
SPLIT_STREAMS = {"train": 0, "voc_val": 1, "voc": 2}  # independent random streams per split.
NUM_TRAIN_SHARDS = 8


def _texture(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, str]:
  """A low-saturation textured background: stripes, checks, blobs or noise.

  Returns (uint8 [size, size, 3], its word in TEXTURE_WORDS).
  """
  base = rng.uniform(70, 190, size=3)
  alt = np.clip(base + rng.uniform(-45, 45, size=3), 0, 255)
  yy, xx = np.mgrid[:size, :size]
  kind = rng.integers(4)
  period = rng.integers(4, 12)
  if kind == 0:  # stripes at a random angle
    theta = rng.uniform(0, np.pi)
    mask = (np.cos(theta) * xx + np.sin(theta) * yy) // period % 2 == 0
  elif kind == 1:  # checker board
    mask = (xx // period + yy // period) % 2 == 0
  elif kind == 2:  # smooth blobs from upsampled noise
    coarse = rng.random((size // 8 + 1, size // 8 + 1))
    mask = np.kron(coarse, np.ones((8, 8)))[:size, :size] > 0.5
  else:
    mask = rng.random((size, size)) > 0.5
  img = np.where(mask[..., None], base, alt)
  img += rng.normal(0, 8, size=img.shape)
  return np.clip(img, 0, 255).astype(np.uint8), TEXTURE_WORDS[kind]


def _polygon(name: str, cx: float, cy: float, r: float, rot: float) -> list:
  """Vertices of the polygonal classes (square, triangle, star, cross, diamond) around (cx, cy)."""
  if name == "square":
    angles, radii = np.arange(4) * np.pi / 2 + np.pi / 4, [r] * 4
  elif name == "triangle":
    angles, radii = np.arange(3) * 2 * np.pi / 3 - np.pi / 2, [r] * 3
  elif name == "diamond":
    angles, radii = np.arange(4) * np.pi / 2, [r, 0.6 * r, r, 0.6 * r]
  elif name == "star":
    angles, radii = np.arange(10) * np.pi / 5 - np.pi / 2, [r, 0.45 * r] * 5
  elif name == "cross":
    w = 0.35 * r
    pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w),
           (-w, r)]
    angles = [np.arctan2(y, x) for x, y in pts]
    radii = [np.hypot(x, y) for x, y in pts]
  else:
    raise ValueError(name)
  return [(cx + rad * np.cos(a + rot), cy + rad * np.sin(a + rot)) for a, rad in zip(angles, radii)]


def _draw(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
  box = (cx - r, cy - r, cx + r, cy + r)
  if name == "circle":
    draw.ellipse(box, fill=fill)
  elif name == "ring":
    draw.ellipse(box, outline=fill, width=max(2, int(r * 0.4)))
  elif name == "crescent":
    draw.ellipse(box, fill=fill)  # the caller cuts the bite out
  else:
    draw.polygon(_polygon(name, cx, cy, r, rot), fill=fill)


def render_example(rng: np.random.Generator, image_size: int):
  """One scene. Returns (image uint8 [S,S,3], label uint8 [S,S] with 0 = background, class names in the image,
  the background's word in TEXTURE_WORDS)."""
  texture, background = _texture(rng, image_size)
  img = Image.fromarray(texture)
  label = Image.new("L", (image_size, image_size), 0)
  draw, ldraw = ImageDraw.Draw(img), ImageDraw.Draw(label)
  num = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
  classes = rng.choice(np.arange(1, len(CLASS_NAMES)), size=num, replace=False)
  for c in classes:
    name = CLASS_NAMES[c]
    r = rng.uniform(*OBJECT_RADIUS) * image_size
    cx, cy = rng.uniform(r, image_size - r, size=2)
    rot = rng.uniform(0, 2 * np.pi)
    colour = tuple(int(v) for v in np.clip(np.array(CLASS_COLOURS[name][1]) + rng.normal(0, 15, 3), 0, 255))
    before_img, before_label = np.array(img), np.array(label)
    _draw(draw, name, cx, cy, r, rot, colour)
    _draw(ldraw, name, cx, cy, r, rot, int(c))
    if name == "crescent":  # a disc with an offset bite: pixels under the bite go back to what was there
      bite = Image.new("L", img.size, 0)
      ox, oy = 0.55 * r * np.cos(rot), 0.55 * r * np.sin(rot)
      ImageDraw.Draw(bite).ellipse((cx + ox - 0.8 * r, cy + oy - 0.8 * r, cx + ox + 0.8 * r, cy + oy + 0.8 * r),
                                   fill=1)
      b = np.array(bite).astype(bool)
      im, lab = np.array(img), np.array(label)
      im[b], lab[b] = before_img[b], before_label[b]
      img, label = Image.fromarray(im), Image.fromarray(lab)
      draw, ldraw = ImageDraw.Draw(img), ImageDraw.Draw(label)
  names = [CLASS_NAMES[c] for c in classes]
  return np.array(img), np.array(label), names, background


def make_caption(rng: np.random.Generator, names: list, background: str,
                 scene_share: float = DEFAULT_SCENE_SHARE) -> str:
  """A natural-ish caption that names every object, sometimes with its colour, plus distractor words; templates
  that mention the background name its texture (`background`, a TEXTURE_WORDS entry). scene_share: see
  SCENE_TEMPLATES."""
  phrases = []
  for n in names:
    colour = CLASS_COLOURS[n][0]
    words = [n] if rng.random() < 0.5 else [colour, n]
    if rng.random() < 0.3:
      words.insert(0, str(rng.choice(ADJECTIVES)))
    phrases.append(("an " if words[0][0] in "aeiou" else "a ") + " ".join(words))
  if len(phrases) == 1:
    objs = phrases[0]
  else:
    objs = ", ".join(phrases[:-1]) + " and " + phrases[-1]
  if scene_share < 0:
    template = str(rng.choice(CAPTION_TEMPLATES))
  else:
    template = str(rng.choice(SCENE_TEMPLATES if rng.random() < scene_share else OBJECT_TEMPLATES))
  return template.format(objs, bg=background, adj=rng.choice(ADJECTIVES))


def caption_nouns(caption: str, names: list, background: str) -> list:
  """The noun phrases a caption mentions: its objects' class names, then the background's phrase (e.g. "striped
  paper") when the caption names it, as nouns extracted from a real caption include the scene's."""
  phrases = (f"{background} {noun}" for noun in BACKGROUND_NOUNS)
  return list(names) + [phrase for phrase in phrases if phrase in caption][:1]


def _jpeg(array: np.ndarray, quality: int = 92) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def _rng(seed: int, split: str) -> np.random.Generator:
  return np.random.default_rng([seed, SPLIT_STREAMS[split]])


def write_train_shards(out_dir: str, num_examples: int, image_size: int, seed: int,
                       num_shards: int = NUM_TRAIN_SHARDS, scene_share: float = DEFAULT_SCENE_SHARE) -> list:
  """Writes the captioned training shards (scene_share: see SCENE_TEMPLATES); returns their paths."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mixreorg_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  rng = _rng(seed, "train")
  paths = [os.path.join(out_dir, f"train-{i:05d}-of-{num_shards:05d}.tfrecord") for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  try:
    for i in range(num_examples):
      image, _, names, background = render_example(rng, image_size)
      caption = make_caption(rng, names, background, scene_share)
      nouns = caption_nouns(caption, names, background)
      writers[i % num_shards].write(preprocess.make_example(
          {"jpg": _jpeg(image), "txt": caption.encode(), "nouns": [n.encode() for n in nouns]}))
  finally:
    for w in writers:
      w.close()
  return paths


def write_voc_split(root: str, num_examples: int, image_size: int, seed: int, split: str) -> None:
  """A segmentation set in VOC layout under root (split names the random stream: voc_val or voc)."""
  rng = _rng(seed, split)
  for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  ids = []
  for i in range(num_examples):
    image, label, _, _ = render_example(rng, image_size)
    name = f"{split}_{i:06d}"
    ids.append(name)
    with open(os.path.join(root, "JPEGImages", name + ".jpg"), "wb") as f:
      f.write(_jpeg(image, quality=95))
    visualize.save_label_png(os.path.join(root, "SegmentationClass", name + ".png"), label)
  with open(os.path.join(root, "ImageSets/Segmentation/val.txt"), "w") as f:
    f.write("\n".join(ids) + "\n")
  with open(os.path.join(root, "class_names.txt"), "w") as f:
    f.write("\n".join(CLASS_NAMES) + "\n")


def ensure_synthetic_data(out_dir: str, num_train: int = 8000, num_val: int = 200, num_test: int = 500,
                          image_size: int = 64, seed: int = 0, scene_share: float = DEFAULT_SCENE_SHARE) -> str:
  """Generates the synthetic data into out_dir unless a complete copy with the same arguments is there.

  scene_share: see SCENE_TEMPLATES; it changes the training captions only (the segmentation sets are the same).
  Returns the glob of the training shards. Safe to call from every host: each writes the same bytes.
  """
  check_scene_share(scene_share)
  args = dict(num_train=num_train, num_val=num_val, num_test=num_test, image_size=image_size, seed=seed,
              version=DATA_VERSION)
  if scene_share != DEFAULT_SCENE_SHARE:  # a copy written before the argument existed stays complete.
    args["scene_share"] = scene_share
  marker = os.path.join(out_dir, "COMPLETE")
  pattern = os.path.join(out_dir, "train-*-of-*.tfrecord")
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == args:
        return pattern
  os.makedirs(out_dir, exist_ok=True)
  write_train_shards(out_dir, num_train, image_size, seed, scene_share=scene_share)
  write_voc_split(os.path.join(out_dir, "voc_val"), num_val, image_size, seed, "voc_val")
  write_voc_split(os.path.join(out_dir, "voc"), num_test, image_size, seed, "voc")
  with open(marker, "w") as f:
    json.dump(args, f)
  return pattern


def check_scene_share(scene_share: float, name: str = "scene_share") -> None:
  """Raises a ValueError naming `name` unless scene_share is a probability or DEFAULT_SCENE_SHARE."""
  if not (0.0 <= scene_share <= 1.0 or scene_share == DEFAULT_SCENE_SHARE):
    raise ValueError(f"{name}={scene_share}: expected a probability in [0, 1], or {DEFAULT_SCENE_SHARE} for every "
                     f"caption template equally often ({len(SCENE_TEMPLATES)} of {len(CAPTION_TEMPLATES)} describe "
                     "the background).")


def sample_captions(num: int, seed: int = 0) -> list:
  """Captions drawn like the training ones (without rendering images); used to fit the SentencePiece model."""
  rng = np.random.default_rng([seed, 99])
  out = []
  for _ in range(num):
    k = int(rng.choice([1, 2, 3]))
    names = [CLASS_NAMES[c] for c in rng.choice(np.arange(1, len(CLASS_NAMES)), size=k, replace=False)]
    out.append(make_caption(rng, names, str(rng.choice(TEXTURE_WORDS))))
  return out


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("num_train", 8000, "Training examples.")
  flags.DEFINE_integer("num_val", 200, "Images in DIR/voc_val (for tuning).")
  flags.DEFINE_integer("num_test", 500, "Images in DIR/voc (held out).")
  flags.DEFINE_integer("image_size", 64, "Image size.")
  flags.DEFINE_integer("seed", 0, "Seed of every split's random stream.")
  flags.DEFINE_float("scene_share", DEFAULT_SCENE_SHARE, "Share of training captions that describe the background "
                     f"(< 0: every template equally often, {len(SCENE_TEMPLATES)} in {len(CAPTION_TEMPLATES)}).")
  flags.DEFINE_string("spm_out", "", "Instead: fit the SentencePiece model to this prefix.")
  flags.DEFINE_integer("spm_vocab_size", 256, "Vocabulary size of --spm_out.")
  flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  a = flags.FLAGS
  if a.spm_out:
    from mixreorg_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    path = tokenizers.train_sentencepiece(sample_captions(20000, a.seed), a.spm_out, a.spm_vocab_size)
    print(f"wrote {path}")
    return
  pattern = ensure_synthetic_data(a.out, a.num_train, a.num_val, a.num_test, a.image_size, a.seed, a.scene_share)
  print(f"synthetic data ready: {pattern}, {a.out}/voc_val, {a.out}/voc")


if __name__ == "__main__":
  define_flags()
  app.run(main)
