"""Readers for the zero-shot segmentation benchmarks, in their usual on-disk layouts (no mmcv/mmseg).

Every reader returns a `SegDataset`: iterating it yields `(name, image, label)` with image uint8 [H, W, 3] (RGB)
and label uint8 [H, W] of class ids, 255 = ignore. Class 0 is "background" where the benchmark has one.

  name           root (config.data.root) holds                                          classes
  voc            VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation} 20 + background
  context        VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext,                59 + background
                   ImageSets/SegmentationContext}  (or full labels, see `pascal_context`)
  coco_object    images/val2017 (or val2017) + annotations/instances_val2017.json,         80 + background
                   or GroupViT's converted annotations/val2017/*_instanceTrainIds.png
  ade20k         ADEChallengeData2016/{images, annotations}/validation                     150
  scene_parse150 a TFDS data_dir with scene_parse150 prepared ("" = the TFDS default)      150
  voc_layout     any folder in VOC layout with class_names.txt (line 0 = background)      from the file

`with_background=False` drops the background class of a dataset that has one (its pixels become 255 and class
k becomes k - 1): PASCAL Context then is the 59-class benchmark instead of GroupViT's 60, VOC the 20-class one.
"""
import dataclasses
import glob
import json
import os
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from mixreorg_jax.seg_metrics import IGNORE_INDEX

ROOT_KEY = "config.data.root"
Example = tuple  # (name: str, image: uint8 [H, W, 3], label: uint8 [H, W])

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
# PASCAL Context's 59 classes as they are spelled in the release's labels.txt, in the order of the converted
# labels (1..59; 0 = background = every other full class), and their ids in the 459-class labels.txt. This
# is the documented 59-class subset (Mottaghi et al. 2014) that the standard conversion of trainval_merged.json
# writes into SegmentationClassContext.
CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door",
    "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain",
    "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window",
    "wood")
CONTEXT59_FULL_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158, 159,
    162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366, 368,
    397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
assert len(CONTEXT59_CLASSES) == len(CONTEXT59_FULL_IDS) == 59


@dataclasses.dataclass(frozen=True)
class SegDataset:
  """A segmentation benchmark: its class names and a re-iterable stream of (name, image, label).

  label_suffix: how a label file is named after the example name (predictions are saved under the same name).
  """
  name: str
  class_names: tuple
  num_images: int
  iterate: Callable[[], Iterator[Example]]
  label_suffix: str = ".png"

  def __len__(self) -> int:
    return self.num_images

  def __iter__(self) -> Iterator[Example]:
    return self.iterate()


# ----------------------------------------------------------------------------------------------------------------
# Small readers shared by the layouts.
# ----------------------------------------------------------------------------------------------------------------
def _layout_error(dataset: str, message: str) -> FileNotFoundError:
  return FileNotFoundError(f"{dataset}: {message} Set {ROOT_KEY} to the dataset folder "
                           "(see mixreorg_jax/data/seg_datasets.py for the expected layout).")


def read_image(path: str) -> np.ndarray:
  """A photo as uint8 [H, W, 3] RGB, as it is meant to be seen.

  The EXIF orientation is applied (as OpenCV's imread, hence mmseg, does); greyscale, palette and CMYK images
  become RGB; transparent pixels are laid over white; 16-bit and 32-bit greyscale values are scaled to 8 bits.
  """
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth (PNG 16-bit greyscale opens as I;16).
        grey = np.asarray(im, np.float64)
        peak = 1.0 if im.mode == "F" and grey.max(initial=0) <= 1.0 else 65535.0
        return np.repeat(np.clip(np.round(grey * 255.0 / peak), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
      if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError.
    raise ValueError(f"{path}: not a readable image ({e}).") from e


def read_label(path: str) -> np.ndarray:
  """A label map PNG as integer ids [H, W]: the palette index of a palette PNG, the value of a grey one.

  An RGB-rendered label map cannot be read back to ids unambiguously, so it is an error.
  """
  with Image.open(path) as im:
    if im.mode in ("RGB", "RGBA"):
      raise ValueError(f"{path}: label maps must be palette ('P') or greyscale PNGs of class ids, got mode "
                       f"{im.mode} (a colour rendering).")
    label = np.asarray(im)
  return label if label.dtype == np.uint8 else label.astype(np.int32)


def _find_root(dataset: str, root: str, candidates: Sequence[str], marker: str) -> str:
  """The first of root/candidate that holds `marker`; a clear error otherwise."""
  if not root or not os.path.isdir(root):
    raise _layout_error(dataset, f"the dataset folder {root!r} does not exist.")
  tried = [os.path.join(root, c) if c else root for c in candidates]
  for path in tried:
    if os.path.isdir(os.path.join(path, marker)):
      return path
  raise _layout_error(dataset, f"expected a {marker}/ folder in one of {tried}.")


def _read_split(dataset: str, split_file: str) -> list:
  """The example names listed one per line in split_file."""
  if not os.path.isfile(split_file):
    raise _layout_error(dataset, f"the split file {split_file} is missing (set config.data.split to a split "
                        f"listed in {os.path.dirname(split_file)}).")
  with open(split_file) as f:
    names = [line.strip().split()[0] for line in f if line.strip()]
  if not names:
    raise ValueError(f"{dataset}: the split file {split_file} is empty; set config.data.split to a split with "
                     "examples.")
  return names


def _check_pairs(dataset: str, pairs: Sequence[tuple]) -> None:
  """Every (name, image_path, label_path) names existing files; lists the first few that do not."""
  missing = [p for _, image, label in pairs for p in (image, label) if not os.path.isfile(p)]
  if missing:
    raise _layout_error(dataset, f"{len(missing)} image/label files listed by the split are missing, e.g. "
                        f"{missing[:3]}.")


def _limit(items: Sequence, max_images: int) -> list:
  """The first max_images items (all when max_images <= 0): config.data.max_images for quick runs."""
  return list(items[:max_images] if max_images and max_images > 0 else items)


def drop_background(label: np.ndarray) -> np.ndarray:
  """uint8 [H, W] with class 0 = background -> background ignored (255), classes k -> k - 1; 255 stays."""
  label = np.asarray(label)
  out = label.astype(np.int32) - 1
  out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
  return out.astype(np.uint8)


def _file_dataset(dataset: str, class_names: Sequence[str], pairs: Sequence[tuple],
                  label_fn: Callable[[np.ndarray], np.ndarray] = lambda x: x,
                  read_label_fn: Callable[[str], np.ndarray] = read_label, label_suffix: str = ".png",
                  with_background: bool = True) -> SegDataset:
  """A SegDataset over (name, image_path, label_path) files, checked up front, read lazily."""
  if not pairs:
    raise ValueError(f"{dataset}: no examples found; check {ROOT_KEY} and config.data.split.")
  _check_pairs(dataset, pairs)
  class_names = tuple(class_names)
  if not with_background:
    if class_names[0] != "background":
      raise ValueError(f"{dataset} has no background class; set config.with_background=True for it.")
    class_names = class_names[1:]

  def iterate():
    for name, image_path, label_path in pairs:
      image = read_image(image_path)
      label = label_fn(read_label_fn(label_path))
      if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"{dataset}: image {image_path} is {image.shape[:2]} but its label {label_path} is "
                         f"{label.shape[:2]}; the image and label folders do not match.")
      if not with_background:
        label = drop_background(label)
      yield name, image, label.astype(np.uint8)

  return SegDataset(dataset, class_names, len(pairs), iterate, label_suffix)


# ----------------------------------------------------------------------------------------------------------------
# PASCAL VOC 2012 and any folder in VOC layout.
# ----------------------------------------------------------------------------------------------------------------
def _voc_pairs(folder: str, split: str, label_dir: str, split_dir: str, max_images: int, dataset: str) -> list:
  names = _limit(_read_split(dataset, os.path.join(folder, "ImageSets", split_dir, split + ".txt")), max_images)
  return [(n, os.path.join(folder, "JPEGImages", n + ".jpg"), os.path.join(folder, label_dir, n + ".png"))
          for n in names]


def pascal_voc(root: str, split: str = "val", max_images: int = 0, with_background: bool = True) -> SegDataset:
  """PASCAL VOC 2012 (1449 val images): root = the folder with VOCdevkit/, or VOC2012/ itself.

  SegmentationClass/*.png are palette PNGs whose index is the class (0 = background, 255 = the ignored object
  borders); the palette index is read, never the colour.
  """
  folder = _find_root("voc", root, ("VOCdevkit/VOC2012", "VOC2012", ""), "SegmentationClass")
  pairs = _voc_pairs(folder, split, "SegmentationClass", "Segmentation", max_images, "voc")
  return _file_dataset("voc", VOC_CLASSES, pairs, with_background=with_background)


def read_class_names(path: str) -> tuple:
  """class_names.txt: one class name per line, line 0 = background."""
  if not os.path.isfile(path):
    raise _layout_error("voc_layout", f"expected the class list {path} (one name per line, line 0 = background).")
  with open(path) as f:
    names = tuple(line.strip() for line in f if line.strip())
  if len(names) < 2:
    raise ValueError(f"voc_layout: {path} lists {len(names)} classes; it needs background plus at least one.")
  return names


def voc_layout(root: str, split: str = "val", max_images: int = 0, with_background: bool = True) -> SegDataset:
  """Any folder with JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt and class_names.txt."""
  folder = _find_root("voc_layout", root, ("",), "SegmentationClass")
  names = read_class_names(os.path.join(folder, "class_names.txt"))
  pairs = _voc_pairs(folder, split, "SegmentationClass", "Segmentation", max_images, "voc_layout")
  return _file_dataset("voc_layout", names, pairs, with_background=with_background)


# ----------------------------------------------------------------------------------------------------------------
# PASCAL Context (59 classes + background).
# ----------------------------------------------------------------------------------------------------------------
def context_full_to_59(labels_txt: str = "") -> np.ndarray:
  """A lookup table from PASCAL Context's full label ids to the 59-class ids (0 = background).

  labels_txt: the release's labels.txt ("<id>: <name>" per line, 459 classes). The 59 classes are found in it by
  name, so a release with another numbering maps right too. "" = the ids of the 459-class labels.txt.
  Returns:
    uint8 [max_id + 1]: lut[full_id] in 0..59; every class outside the 59 (and id 0, unlabelled) maps to 0.
  """
  if labels_txt:
    by_name = {}
    with open(labels_txt) as f:
      for line in f:
        if ":" in line:
          key, name = line.split(":", 1)
          by_name[_norm(name)] = int(key)
    missing = [n for n in CONTEXT59_CLASSES if _norm(n) not in by_name]
    if missing:
      raise ValueError(f"context: {labels_txt} does not name the classes {missing}; set "
                       "config.data.context_labels_txt='' to use the built-in 459-class ids.")
    ids = [by_name[_norm(n)] for n in CONTEXT59_CLASSES]
  else:
    ids = list(CONTEXT59_FULL_IDS)
  lut = np.zeros(max(max(ids), 459) + 1, np.uint8)
  lut[ids] = np.arange(1, 60, dtype=np.uint8)
  return lut


def _norm(name: str) -> str:
  return "".join(name.lower().split()).replace("_", "")


def read_full_context_label(path: str) -> np.ndarray:
  """A full-label map of the Context release: <id>.mat (its LabelMap) or a 16-bit PNG of full ids. int32 [H, W]."""
  if path.endswith(".mat"):
    import scipy.io  # only for the release's .mat files; scipy comes with scikit-learn.
    return np.asarray(scipy.io.loadmat(path)["LabelMap"], np.int32)
  return read_label(path).astype(np.int32)


def pascal_context(root: str, split: str = "val", max_images: int = 0, with_background: bool = True,
                   full_labels: str = "", labels_txt: str = "") -> SegDataset:
  """PASCAL Context val (5105 images): root = the folder with VOCdevkit/, or VOC2010/ itself.

  Default labels: SegmentationClassContext/*.png with 0 = background and 1..59 = CONTEXT59_CLASSES, as the
  standard conversion of trainval_merged.json writes them; splits in ImageSets/SegmentationContext.
  with_background=True is GroupViT's 60-class protocol; False the 59-class one (background ignored).
  full_labels: a folder of the release's full labels (<name>.mat with LabelMap, or 16-bit <name>.png) to map to
  the 59 classes here with `context_full_to_59(labels_txt)`, instead of the converted PNGs.
  """
  folder = _find_root("context", root, ("VOCdevkit/VOC2010", "VOC2010", ""), "JPEGImages")
  split_dir = "SegmentationContext"
  if not os.path.isdir(os.path.join(folder, "ImageSets", split_dir)):
    split_dir = "Segmentation"  # some copies keep the Context splits beside VOC's.
  if not full_labels:
    if not os.path.isdir(os.path.join(folder, "SegmentationClassContext")):
      raise _layout_error("context", f"expected SegmentationClassContext/ in {folder} (0..59 PNGs from the "
                          "standard conversion), or set config.data.context_full_labels to the release's labels.")
    pairs = _voc_pairs(folder, split, "SegmentationClassContext", split_dir, max_images, "context")
    return _file_dataset("context", ("background",) + CONTEXT59_CLASSES, pairs, with_background=with_background)
  label_dir = full_labels if os.path.isabs(full_labels) else os.path.join(folder, full_labels)
  if not os.path.isdir(label_dir):
    raise _layout_error("context", f"config.data.context_full_labels={full_labels!r}: no folder {label_dir}.")
  pairs = _voc_pairs(folder, split, label_dir, split_dir, max_images, "context")
  pairs = [(n, image, label if os.path.isfile(label) else label[:-4] + ".mat") for n, image, label in pairs]
  lut = context_full_to_59(labels_txt)
  return _file_dataset("context", ("background",) + CONTEXT59_CLASSES, pairs,
                       label_fn=lambda full: lut[np.clip(full, 0, len(lut) - 1)],
                       read_label_fn=read_full_context_label, with_background=with_background)


# ----------------------------------------------------------------------------------------------------------------
# COCO-Object: 80 thing classes + background, from the instance annotations.
# ----------------------------------------------------------------------------------------------------------------
def rle_string_to_counts(s: str) -> list:
  """Decodes COCO's compressed RLE string (the LEB128-like format of the COCO mask API) into run lengths.

  Each count is 5-bit groups, least significant first, as chars offset by 48; bit 0x20 says more groups
  follow, bit 0x10 of the last group is the sign. From the third count on, a count is stored as the
  difference to the count two places before.
  """
  counts, p = [], 0
  while p < len(s):
    x, k, more = 0, 0, True
    while more:
      c = ord(s[p]) - 48
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and (c & 0x10):
        x |= -1 << (5 * k)
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x)
  return counts


def rle_decode(rle: dict) -> np.ndarray:
  """A COCO RLE ({"size": [h, w], "counts": list or compressed str}) as a bool mask [h, w].

  Runs alternate 0s and 1s, starting with 0s, over the pixels in column-major (Fortran) order.
  """
  h, w = rle["size"]
  counts = rle["counts"]
  if isinstance(counts, (str, bytes)):
    counts = rle_string_to_counts(counts.decode() if isinstance(counts, bytes) else counts)
  counts = np.asarray(counts, np.int64)
  if counts.sum() != h * w:
    raise ValueError(f"COCO RLE: run lengths sum to {counts.sum()}, expected h*w = {h * w}.")
  values = np.arange(len(counts)) % 2 == 1
  return np.repeat(values, counts).reshape(w, h).T


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
  """COCO polygons ([x0, y0, x1, y1, ...] each, in pixels) rasterised and united: bool [height, width]."""
  canvas = Image.new("L", (width, height), 0)
  draw = ImageDraw.Draw(canvas)
  for poly in polygons:
    if len(poly) >= 6:
      draw.polygon([(float(x), float(y)) for x, y in zip(poly[0::2], poly[1::2])], outline=1, fill=1)
  return np.asarray(canvas, bool)


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
  """Any COCO `segmentation` (polygon list, uncompressed or compressed RLE) as bool [height, width]."""
  if isinstance(segmentation, list):
    return polygons_to_mask(segmentation, height, width)
  return rle_decode(segmentation)


def coco_instances_to_label(image_info: dict, annotations: Sequence[dict], category_to_class: dict,
                            crowd: str = "ignore") -> np.ndarray:
  """One image's COCO-Object label map from its instance annotations: uint8 [h, w].

  Non-crowd instances are painted largest first, so a small object on a larger one stays visible. crowd:
  "ignore" marks crowd regions 255 where no single instance lies; "class" paints them with their class (as in
  the COCO-Stuff maps GroupViT converted); "background" leaves them 0.
  """
  h, w = image_info["height"], image_info["width"]
  label = np.zeros((h, w), np.uint8)
  singles = sorted((a for a in annotations if not a.get("iscrowd", 0)), key=lambda a: -a.get("area", 0))
  crowds = [a for a in annotations if a.get("iscrowd", 0)]
  if crowd == "class":
    singles = sorted(crowds, key=lambda a: -a.get("area", 0)) + singles
  for ann in singles:
    label[annotation_mask(ann["segmentation"], h, w)] = category_to_class[ann["category_id"]]
  if crowd == "ignore":
    for ann in crowds:
      label[annotation_mask(ann["segmentation"], h, w) & (label == 0)] = IGNORE_INDEX
  return label


def coco_object(root: str, split: str = "val2017", max_images: int = 0, with_background: bool = True,
                crowd: str = "ignore") -> SegDataset:
  """COCO-Object (5000 val images): 80 thing classes (category ids in increasing order -> 1..80) + background.

  root holds images/<split>/*.jpg (or <split>/*.jpg) and either annotations/instances_<split>.json, decoded here
  (polygons and RLE; stuff and unannotated pixels are background), or GroupViT's converted
  annotations/<split>/*_instanceTrainIds.png, read as they are (GroupViT's exact ground truth).
  """
  if crowd not in ("ignore", "class", "background"):
    raise ValueError(f"config.data.coco_crowd={crowd!r}: expected 'ignore', 'class' or 'background'.")
  if not root or not os.path.isdir(root):
    raise _layout_error("coco_object", f"the dataset folder {root!r} does not exist.")
  image_dirs = [os.path.join(root, "images", split), os.path.join(root, split)]
  image_dir = next((d for d in image_dirs if os.path.isdir(d)), None)
  if image_dir is None:
    raise _layout_error("coco_object", f"expected the images in one of {image_dirs}.")
  json_path = os.path.join(root, "annotations", f"instances_{split}.json")
  converted_dir = os.path.join(root, "annotations", split)
  if os.path.isfile(json_path):
    return _coco_from_json(json_path, image_dir, max_images, with_background, crowd)
  if os.path.isdir(converted_dir):
    suffix = "_instanceTrainIds.png"
    labels = sorted(glob.glob(os.path.join(converted_dir, "*" + suffix)))
    names = _limit([os.path.basename(p)[:-len(suffix)] for p in labels], max_images)
    pairs = [(n, os.path.join(image_dir, n + ".jpg"), os.path.join(converted_dir, n + suffix)) for n in names]
    return _file_dataset("coco_object", ("background",) + COCO_OBJECT_CLASSES, pairs, label_suffix=suffix,
                         with_background=with_background)
  raise _layout_error("coco_object", f"expected {json_path} or converted label maps in {converted_dir}/.")


def _coco_from_json(json_path: str, image_dir: str, max_images: int, with_background: bool,
                    crowd: str) -> SegDataset:
  with open(json_path) as f:
    coco = json.load(f)
  categories = sorted(coco["categories"], key=lambda c: c["id"])
  category_to_class = {c["id"]: i + 1 for i, c in enumerate(categories)}
  class_names = ("background",) + tuple(c["name"] for c in categories)
  by_image = {}
  for ann in coco.get("annotations", []):
    by_image.setdefault(ann["image_id"], []).append(ann)
  images = _limit(sorted(coco["images"], key=lambda im: im["file_name"]), max_images)
  if not images:
    raise ValueError(f"coco_object: {json_path} lists no images; check {ROOT_KEY} and config.data.split.")
  missing = [im["file_name"] for im in images if not os.path.isfile(os.path.join(image_dir, im["file_name"]))]
  if missing:
    raise _layout_error("coco_object", f"{len(missing)} images of {json_path} are missing in {image_dir}, e.g. "
                        f"{missing[:3]}.")

  def iterate():
    for info in images:
      name = os.path.splitext(info["file_name"])[0]
      image = read_image(os.path.join(image_dir, info["file_name"]))
      if image.shape[:2] != (info["height"], info["width"]):
        raise ValueError(f"coco_object: {info['file_name']} is {image.shape[:2]} but {json_path} says "
                         f"{(info['height'], info['width'])}; the images and annotations do not match.")
      label = coco_instances_to_label(info, by_image.get(info["id"], []), category_to_class, crowd)
      yield name, image, label if with_background else drop_background(label)

  names = class_names if with_background else class_names[1:]
  return SegDataset("coco_object", names, len(images), iterate)


COCO_OBJECT_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
assert len(COCO_OBJECT_CLASSES) == 80


# ----------------------------------------------------------------------------------------------------------------
# ADE20K (SceneParsing 150).
# ----------------------------------------------------------------------------------------------------------------
def ade_label(label: np.ndarray) -> np.ndarray:
  """ADE20K ids 0 ("other", not evaluated) .. 150 -> 255 and 0..149. uint8 [H, W]."""
  return drop_background(label)


def ade20k(root: str, split: str = "validation", max_images: int = 0, class_names: Sequence[str] = (),
           with_background: bool = False) -> SegDataset:
  """ADE20K SceneParsing (2000 val images): root = the folder with ADEChallengeData2016/, or that folder."""
  if with_background:
    raise ValueError("ade20k has no background class; set config.with_background=False.")
  folder = _find_root("ade20k", root, ("ADEChallengeData2016", ""), "annotations")
  image_dir = os.path.join(folder, "images", split)
  label_dir = os.path.join(folder, "annotations", split)
  if not os.path.isdir(image_dir):
    raise _layout_error("ade20k", f"expected the images in {image_dir} (set config.data.split).")
  names = _limit(sorted(os.path.splitext(p)[0] for p in os.listdir(image_dir) if p.endswith(".jpg")), max_images)
  pairs = [(n, os.path.join(image_dir, n + ".jpg"), os.path.join(label_dir, n + ".png")) for n in names]
  return _file_dataset("ade20k", tuple(class_names) or ADE20K_CLASSES, pairs, label_fn=ade_label)


def scene_parse150(data_dir: str = "", split: str = "validation", max_images: int = 0,
                   class_names: Sequence[str] = ()) -> SegDataset:
  """ADE20K from TFDS `scene_parse150` (already prepared: nothing is downloaded here)."""
  import tensorflow_datasets as tfds  # TF only when this source is used.
  builder = tfds.builder("scene_parse150", data_dir=data_dir or None)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"scene_parse150: TFDS data is not prepared in {builder.data_dir}. Prepare it on a machine with internet "
        "(tfds build scene_parse150) and set config.data.root to its TFDS data_dir, or use "
        "config.data.name='ade20k' with the ADEChallengeData2016 folder.")
  num = builder.info.splits[split].num_examples
  num = min(num, max_images) if max_images and max_images > 0 else num

  def iterate():
    ds = builder.as_dataset(split=split, shuffle_files=False).take(num)
    for i, ex in enumerate(tfds.as_numpy(ds)):
      yield f"{split}_{i:05d}", ex["image"], ade_label(ex["annotation"][..., 0])

  return SegDataset("scene_parse150", tuple(class_names) or ADE20K_CLASSES, num, iterate)


ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")
assert len(ADE20K_CLASSES) == 150


# ----------------------------------------------------------------------------------------------------------------
# From a config.
# ----------------------------------------------------------------------------------------------------------------
def from_config(config) -> SegDataset:
  """The dataset of an eval config (configs/eval/*.py): config.data.{name, root, split, max_images, ...}.

  The dataset's own class list sets the label ids; config.class_names (the names put into the prompts) must
  have the same length, see `prompt_class_names`.
  """
  d = config.data
  common = dict(split=d.split, max_images=d.max_images)
  readers = {
      "voc": lambda: pascal_voc(d.root, with_background=config.with_background, **common),
      "voc_layout": lambda: voc_layout(d.root, with_background=config.with_background, **common),
      "context": lambda: pascal_context(d.root, with_background=config.with_background,
                                        full_labels=d.get("context_full_labels", ""),
                                        labels_txt=d.get("context_labels_txt", ""), **common),
      "coco_object": lambda: coco_object(d.root, with_background=config.with_background,
                                         crowd=d.get("coco_crowd", "ignore"), **common),
      "ade20k": lambda: ade20k(d.root, with_background=config.with_background, **common),
      "scene_parse150": lambda: scene_parse150(d.root, **common),
  }
  if d.name not in readers:
    raise ValueError(f"config.data.name={d.name!r}: unknown dataset; expected one of {sorted(readers)}.")
  return readers[d.name]()


def prompt_class_names(config, dataset: SegDataset) -> tuple:
  """The class names to put into the prompts: config.class_names, or the dataset's own when that is empty.

  With with_background=False, a config list that still starts with "background" is cut to match the dataset.
  """
  names = tuple(config.class_names) or dataset.class_names
  if len(names) == len(dataset.class_names) + 1 and names[0] == "background":
    names = names[1:]
  if len(names) != len(dataset.class_names):
    raise ValueError(f"config.class_names has {len(names)} names but {dataset.name} has "
                     f"{len(dataset.class_names)} classes ({dataset.class_names[:3]}...); fix config.class_names "
                     "or leave it empty to use the dataset's names.")
  return names
