"""Dataset readers on tiny fixtures written in each benchmark's real on-disk layout."""
import json
import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from configs.eval import context as context_config
from configs.eval import voc as voc_config
from mixreorg_jax.data import seg_datasets as sd
from mixreorg_jax.data import synthetic
from mixreorg_jax.visualize import save_label_png


def _write_jpg(path, h, w, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, quality=95)


def _write_png(path, label):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_label_png(path, label)


def _write_split(path, names):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(n + "\n" for n in names))


def _voc_labels():
  a = np.zeros((12, 16), np.uint8)
  a[2:8, 3:9] = 15  # person
  a[2:8, 9] = 255  # an object border
  b = np.full((10, 14), 7, np.uint8)  # car everywhere
  return {"2007_000032": a, "2007_000039": b}


def _make_voc(root, label_dir="SegmentationClass", split_dir="Segmentation", devkit="VOCdevkit/VOC2012"):
  folder = os.path.join(root, devkit)
  for i, (name, label) in enumerate(_voc_labels().items()):
    _write_jpg(os.path.join(folder, "JPEGImages", name + ".jpg"), *label.shape, seed=i)
    _write_png(os.path.join(folder, label_dir, name + ".png"), label)
  _write_split(os.path.join(folder, "ImageSets", split_dir, "val.txt"), list(_voc_labels()))
  return folder


# ----------------------------------------------------------------------------------------------------------------
def test_voc_reads_palette_indices(tmp_path):
  _make_voc(str(tmp_path))
  ds = sd.pascal_voc(str(tmp_path))
  assert len(ds) == 2 and len(ds.class_names) == 21 and ds.class_names[15] == "person"
  examples = list(ds)
  for (name, image, label), (want_name, want) in zip(examples, _voc_labels().items()):
    assert name == want_name and image.dtype == np.uint8 and image.shape == want.shape + (3,)
    np.testing.assert_array_equal(label, want)  # ids, not colours; 255 kept.
  # The same folder given as VOC2012 itself, limited to one image; without background: 20 classes.
  ds = sd.pascal_voc(str(tmp_path / "VOCdevkit" / "VOC2012"), max_images=1, with_background=False)
  (_, _, label), = list(ds)
  assert len(ds.class_names) == 20 and ds.class_names[14] == "person"
  assert label[3, 4] == 14 and label[0, 0] == 255 and label[3, 9] == 255


def test_voc_errors_name_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.root"):
    sd.pascal_voc(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="SegmentationClass"):
    sd.pascal_voc(str(tmp_path))
  folder = _make_voc(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="train.txt"):
    sd.pascal_voc(str(tmp_path), split="train")
  _write_split(os.path.join(folder, "ImageSets/Segmentation/empty.txt"), [])
  with pytest.raises(ValueError, match="empty"):
    sd.pascal_voc(str(tmp_path), split="empty")
  _write_split(os.path.join(folder, "ImageSets/Segmentation/bad.txt"), ["2007_000032", "2099_999999"])
  with pytest.raises(FileNotFoundError, match="2099_999999"):
    sd.pascal_voc(str(tmp_path), split="bad")
  # An image whose size differs from its label, and a colour-rendered label.
  _write_jpg(os.path.join(folder, "JPEGImages/2007_000039.jpg"), 5, 5)
  with pytest.raises(ValueError, match="do not match"):
    list(sd.pascal_voc(str(tmp_path)))
  Image.new("RGB", (16, 12)).save(os.path.join(folder, "SegmentationClass/2007_000032.png"))
  with pytest.raises(ValueError, match="palette"):
    list(sd.pascal_voc(str(tmp_path)))


def test_voc_layout_reads_the_synthetic_set(tmp_path):
  synthetic.write_voc_split(str(tmp_path), num_examples=3, image_size=32, seed=0, split="voc")
  ds = sd.voc_layout(str(tmp_path))
  assert ds.class_names == synthetic.CLASS_NAMES and len(ds) == 3
  for _, image, label in ds:
    assert image.shape == (32, 32, 3) and label.shape == (32, 32)
    assert label.max() < len(synthetic.CLASS_NAMES) and (label > 0).any()
  os.remove(tmp_path / "class_names.txt")
  with pytest.raises(FileNotFoundError, match="class_names.txt"):
    sd.voc_layout(str(tmp_path))


def test_from_config_uses_the_eval_config(tmp_path):
  _make_voc(str(tmp_path))
  config = voc_config.get_config()
  config.data.root = str(tmp_path)
  config.data.max_images = 1
  ds = sd.from_config(config)
  assert len(ds) == 1
  assert sd.prompt_class_names(config, ds)[11] == "table"  # the config's prompt names.
  config.with_background = False
  assert len(sd.prompt_class_names(config, sd.from_config(config))) == 20
  config.data.name = "vocc"
  with pytest.raises(ValueError, match="config.data.name"):
    sd.from_config(config)


# ----------------------------------------------------------------------------------------------------------------
def test_context_converted_labels_60_and_59(tmp_path):
  folder = str(tmp_path / "VOCdevkit" / "VOC2010")
  label = np.zeros((8, 10), np.uint8)
  label[:4] = 59  # wood
  label[4:, :5] = 1  # aeroplane
  _write_jpg(os.path.join(folder, "JPEGImages/2008_000008.jpg"), 8, 10)
  _write_png(os.path.join(folder, "SegmentationClassContext/2008_000008.png"), label)
  _write_split(os.path.join(folder, "ImageSets/SegmentationContext/val.txt"), ["2008_000008"])
  ds = sd.pascal_context(str(tmp_path))
  assert len(ds.class_names) == 60 and ds.class_names[59] == "wood"
  np.testing.assert_array_equal(next(iter(ds))[2], label)
  ds59 = sd.pascal_context(str(tmp_path), with_background=False)
  assert len(ds59.class_names) == 59
  got = next(iter(ds59))[2]
  assert got[0, 0] == 58 and got[5, 0] == 0 and got[5, 9] == 255
  config = context_config.get_config()
  assert len(sd.prompt_class_names(config, ds)) == 60


def _labels_txt(path, ids_by_name):
  """A labels.txt like the release's: "<id>: <name>", every other id a filler class."""
  by_id = {i: n for n, i in ids_by_name.items()}
  with open(path, "w") as f:
    for i in range(1, 460):
      f.write(f"{i}: {by_id.get(i, f'other thing {i}')}\n")


def test_context_with_its_label_mapping(tmp_path):
  folder = str(tmp_path / "VOC2010")
  # Full labels: unlabelled 0, aeroplane (2), a class outside the 59 (1, accordion), wood (458), tvmonitor (427).
  full = np.array([[0, 2, 1], [458, 427, 300]], np.uint16)
  _write_jpg(os.path.join(folder, "JPEGImages/2008_000002.jpg"), 2, 3)
  os.makedirs(os.path.join(folder, "trainval"))
  scipy.io.savemat(os.path.join(folder, "trainval/2008_000002.mat"), {"LabelMap": full})
  # The same labels as a 16-bit PNG of full ids, for a second image.
  _write_jpg(os.path.join(folder, "JPEGImages/2008_000003.jpg"), 2, 3)
  Image.fromarray(full).save(os.path.join(folder, "trainval/2008_000003.png"))
  _write_split(os.path.join(folder, "ImageSets/SegmentationContext/val.txt"), ["2008_000002", "2008_000003"])
  want = np.array([[0, 1, 0], [59, 55, 0]], np.uint8)
  assert sd.CONTEXT59_CLASSES[55 - 1] == "tvmonitor"

  ds = sd.pascal_context(folder, full_labels="trainval")
  for _, _, label in ds:
    np.testing.assert_array_equal(label, want)

  # labels.txt of the release: mapping by name gives the same table as the built-in ids ...
  release = str(tmp_path / "labels.txt")
  _labels_txt(release, dict(zip(sd.CONTEXT59_CLASSES, sd.CONTEXT59_FULL_IDS)))
  np.testing.assert_array_equal(sd.context_full_to_59(release), sd.context_full_to_59())
  # ... and follows the names when a release numbers them differently.
  shifted = str(tmp_path / "labels_shifted.txt")
  _labels_txt(shifted, {n: i + 100 for i, n in enumerate(sd.CONTEXT59_CLASSES)})
  lut = sd.context_full_to_59(shifted)
  assert lut[100] == 1 and lut[158] == 59 and lut[2] == 0
  broken = str(tmp_path / "labels_broken.txt")
  _labels_txt(broken, {})
  with pytest.raises(ValueError, match="context_labels_txt"):
    sd.context_full_to_59(broken)
  with pytest.raises(FileNotFoundError, match="context_full_labels"):
    sd.pascal_context(folder, full_labels="missing")


# ----------------------------------------------------------------------------------------------------------------
def _rle_to_string(counts):
  """Compressed COCO RLE, written here independently from the decoder under test (the mask API's format)."""
  out = []
  for i, x in enumerate(counts):
    if i > 2:
      x -= counts[i - 2]
    more = True
    while more:
      c = x & 0x1F
      x >>= 5
      more = (x != -1) if (c & 0x10) else (x != 0)
      out.append(chr((c | 0x20 if more else c) + 48))
  return "".join(out)


def _rle_counts(mask):
  """Run lengths of a bool mask in column-major order, starting with a run of zeros."""
  flat = mask.T.reshape(-1).astype(np.int8)
  change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  return np.diff(np.concatenate([[0], change])).tolist()


def test_rle_decoding_round_trips_and_matches_pycocotools():
  rng = np.random.default_rng(0)
  mask = rng.random((13, 9)) < 0.4
  counts = _rle_counts(mask)
  np.testing.assert_array_equal(sd.rle_decode({"size": [13, 9], "counts": counts}), mask)
  np.testing.assert_array_equal(sd.rle_decode({"size": [13, 9], "counts": _rle_to_string(counts)}), mask)
  mask_utils = pytest.importorskip("pycocotools.mask")  # an independent decoder, when installed.
  encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  assert encoded["counts"].decode() == _rle_to_string(counts)
  np.testing.assert_array_equal(sd.rle_decode(encoded), mask)
  poly = [[2.0, 1.0, 8.0, 1.0, 8.0, 10.0, 2.0, 10.0]]
  ours = sd.polygons_to_mask(poly, 13, 9)
  theirs = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 13, 9))).astype(bool)
  assert (ours & theirs).sum() / (ours | theirs).sum() > 0.7  # rasterisation conventions differ at the edges.


def _make_coco(root):
  """val2017 with one 20x30 image: a polygon person, an RLE dog on it, a crowd of people, and category ids 1, 18."""
  h, w = 20, 30
  _write_jpg(os.path.join(root, "images/val2017/000000000139.jpg"), h, w)
  dog = np.zeros((h, w), bool)
  dog[10:14, 4:8] = True
  crowd = np.zeros((h, w), bool)
  crowd[:, 20:] = True
  anns = [
      {"id": 1, "image_id": 139, "category_id": 1, "iscrowd": 0, "area": 120.0,
       "segmentation": [[2, 2, 14, 2, 14, 16, 2, 16]]},
      {"id": 2, "image_id": 139, "category_id": 18, "iscrowd": 0, "area": 16.0,
       "segmentation": {"size": [h, w], "counts": _rle_to_string(_rle_counts(dog))}},
      {"id": 3, "image_id": 139, "category_id": 1, "iscrowd": 1, "area": 200.0,
       "segmentation": {"size": [h, w], "counts": _rle_counts(crowd)}},
  ]
  coco = {"images": [{"id": 139, "file_name": "000000000139.jpg", "height": h, "width": w}],
          "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}], "annotations": anns}
  os.makedirs(os.path.join(root, "annotations"))
  with open(os.path.join(root, "annotations/instances_val2017.json"), "w") as f:
    json.dump(coco, f)


def test_coco_object_masks_from_instances_json(tmp_path):
  _make_coco(str(tmp_path))
  ds = sd.coco_object(str(tmp_path))
  assert ds.class_names == ("background", "person", "dog")
  name, image, label = next(iter(ds))
  assert name == "000000000139" and image.shape == (20, 30, 3)
  assert label[5, 5] == 1 and label[11, 5] == 2  # the small dog stays on top of the person.
  assert label[0, 0] == 0 and label[18, 17] == 0  # background.
  assert (label[:, 20:] == 255).all()  # the crowd region is ignored ...
  assert set(np.unique(label)) == {0, 1, 2, 255}
  _, _, as_class = next(iter(sd.coco_object(str(tmp_path), crowd="class")))
  assert (as_class[:, 20:] == 1).all()  # ... or painted with its class.
  with pytest.raises(ValueError, match="config.data.coco_crowd"):
    sd.coco_object(str(tmp_path), crowd="drop")


def test_coco_object_converted_layout_and_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="images"):
    sd.coco_object(str(tmp_path))
  _write_jpg(str(tmp_path / "images/val2017/000000000285.jpg"), 6, 7)
  with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
    sd.coco_object(str(tmp_path))
  label = np.full((6, 7), 23, np.uint8)
  Image.fromarray(label).save(_mkdirs(tmp_path / "annotations/val2017") / "000000000285_instanceTrainIds.png")
  ds = sd.coco_object(str(tmp_path))
  assert len(ds.class_names) == 81 and ds.class_names[23] == "zebra"
  assert ds.label_suffix == "_instanceTrainIds.png"
  np.testing.assert_array_equal(next(iter(ds))[2], label)


def _mkdirs(path):
  os.makedirs(path, exist_ok=True)
  return path


# ----------------------------------------------------------------------------------------------------------------
def test_ade20k_shifts_ids_and_ignores_other(tmp_path):
  folder = tmp_path / "ADEChallengeData2016"
  _write_jpg(str(folder / "images/validation/ADE_val_00000001.jpg"), 4, 5)
  label = np.array([[0, 1, 150, 2, 3]] * 4, np.uint8)
  Image.fromarray(label).save(_mkdirs(folder / "annotations/validation") / "ADE_val_00000001.png")
  ds = sd.ade20k(str(tmp_path))
  assert len(ds.class_names) == 150 and len(ds) == 1
  name, _, got = next(iter(ds))
  assert name == "ADE_val_00000001"
  np.testing.assert_array_equal(got[0], [255, 0, 149, 1, 2])
  with pytest.raises(ValueError, match="config.with_background=False"):
    sd.ade20k(str(tmp_path), with_background=True)
  with pytest.raises(FileNotFoundError, match="images/training"):
    sd.ade20k(str(tmp_path), split="training")


def test_scene_parse150_not_prepared_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared"):
    sd.scene_parse150(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,classes,threshold", [
    ("voc", 21, 0.95), ("context", 60, 0.35), ("coco_object", 81, 0.95), ("ade20k", 150, -1.0),
    ("voc_layout", 0, 0.95)])
def test_eval_configs_are_locked_and_explicit(name, classes, threshold):
  import importlib
  module = importlib.import_module(f"configs.eval.{name}")
  config = module.get_config()
  assert len(config.class_names) == classes and config.bg_threshold == threshold
  assert config.with_background == (threshold > 0)
  assert config.prompt_templates == ("a photo of a {}.",) and len(module.get_config("full").prompt_templates) == 80
  assert (config.top_k_classes, config.short_side, config.window, config.stride) == (5, 448, 448, 224)
  with pytest.raises(AttributeError):
    config.data.rooot = "/data"  # a typo is an error, not a new key.
