"""The synthetic generator: reproducible shards and VOC-layout segmentation sets that agree with the captions."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mixreorg_jax.data import synthetic
from tests import test_train_common as common


def test_render_is_seeded_and_labels_match_the_named_classes():
  a = synthetic.render_example(np.random.default_rng(3), 64)
  b = synthetic.render_example(np.random.default_rng(3), 64)
  np.testing.assert_array_equal(a[0], b[0])
  image, label, names, background = a
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and 1 <= len(names) <= 3
  present = {synthetic.CLASS_NAMES[c] for c in np.unique(label) if c}
  assert present <= set(names) and present  # occlusion may hide an object, never invent one
  assert background in synthetic.TEXTURE_WORDS
  caption = synthetic.make_caption(np.random.default_rng(0), names, background)
  assert all(n in caption for n in names)


def test_captions_that_mention_the_background_name_its_texture():
  rng = np.random.default_rng(1)
  mentioned = 0
  for _ in range(200):
    _, _, names, background = synthetic.render_example(rng, 32)
    caption = synthetic.make_caption(rng, names, background)
    others = [w for w in synthetic.TEXTURE_WORDS if w != background and w in caption.split(" ")]
    assert not others, caption
    mentioned += background in caption
  assert mentioned > 40  # 5 of the 14 templates mention it.


def test_caption_nouns_add_the_background_phrase_only_when_the_caption_names_it():
  names = ["circle", "star"]
  assert synthetic.caption_nouns("a circle and a star on a dotted background.", names, "dotted") == [
      "circle", "star", "dotted background"]
  assert synthetic.caption_nouns("close-up of a circle and a star on striped paper.", names, "striped") == [
      "circle", "star", "striped paper"]
  assert synthetic.caption_nouns("look at a circle and a star!", names, "noisy") == names
  rng = np.random.default_rng(2)
  for _ in range(100):
    _, _, names, background = synthetic.render_example(rng, 32)
    caption = synthetic.make_caption(rng, names, background)
    nouns = synthetic.caption_nouns(caption, names, background)
    assert nouns[:len(names)] == names and len(nouns) - len(names) == (background in caption), caption
    assert all(n in caption for n in nouns)


def test_ensure_synthetic_data_writes_shards_and_voc_layout(tmp_path):
  pattern = synthetic.ensure_synthetic_data(str(tmp_path), num_train=24, num_val=3, num_test=4, image_size=32)
  files = sorted(tf.io.gfile.glob(pattern))
  assert len(files) == synthetic.NUM_TRAIN_SHARDS
  records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files)]
  assert len(records) == 24
  f = records[0].features.feature
  assert f["jpg"].bytes_list.value[0][:2] == b"\xff\xd8" and f["txt"].bytes_list.value[0]
  assert all(n.decode() in f["txt"].bytes_list.value[0].decode() for n in f["nouns"].bytes_list.value)
  for split, n in (("voc", 4), ("voc_val", 3)):
    root = tmp_path / split
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(ids) == n
    png = Image.open(root / "SegmentationClass" / f"{ids[0]}.png")
    assert png.mode == "P" and png.size == (32, 32)
    assert np.array(png).max() < len(synthetic.CLASS_NAMES)
    assert Image.open(root / "JPEGImages" / f"{ids[0]}.jpg").size == (32, 32)
    assert (root / "class_names.txt").read_text().split("\n")[0] == "background"
  # Held-out and tuning splits come from different random streams.
  v = np.array(Image.open(tmp_path / "voc/JPEGImages/voc_000000.jpg"))
  w = np.array(Image.open(tmp_path / "voc_val/JPEGImages/voc_val_000000.jpg"))
  assert not np.array_equal(v, w)
  mtime = (tmp_path / "COMPLETE").stat().st_mtime_ns
  synthetic.ensure_synthetic_data(str(tmp_path), num_train=24, num_val=3, num_test=4, image_size=32)
  assert (tmp_path / "COMPLETE").stat().st_mtime_ns == mtime  # complete: not regenerated
  # A copy from the generator before DATA_VERSION (its marker has no version) is written again.
  marker = json.loads((tmp_path / "COMPLETE").read_text())
  (tmp_path / "COMPLETE").write_text(json.dumps({k: v for k, v in marker.items() if k != "version"}))
  synthetic.ensure_synthetic_data(str(tmp_path), num_train=24, num_val=3, num_test=4, image_size=32)
  assert json.loads((tmp_path / "COMPLETE").read_text()) == marker
  assert marker["version"] == synthetic.DATA_VERSION


def test_scene_share_sets_how_many_captions_describe_the_background(tmp_path):
  """Default: every template equally often (5 in 14 describe the scene); scene_share p: that share, and the same
  segmentation sets. A share outside [0, 1] is refused before anything is written."""
  def described(share, n=700):
    rng = np.random.default_rng(4)
    captions = [synthetic.make_caption(rng, ["circle"], "dotted", share) for _ in range(n)]
    return np.mean(["dotted" in c for c in captions])
  assert abs(described(synthetic.DEFAULT_SCENE_SHARE) - 5 / 14) < 0.05
  assert described(0.0) == 0.0 and described(1.0) == 1.0
  assert abs(described(0.75) - 0.75) < 0.05
  default, scene = tmp_path / "default", tmp_path / "scene"
  synthetic.ensure_synthetic_data(str(default), num_train=24, num_val=3, num_test=4, image_size=32)
  synthetic.ensure_synthetic_data(str(scene), num_train=24, num_val=3, num_test=4, image_size=32, scene_share=1.0)
  assert "scene_share" not in json.loads((default / "COMPLETE").read_text())
  assert json.loads((scene / "COMPLETE").read_text())["scene_share"] == 1.0
  for split in ("voc", "voc_val"):
    for name in sorted((default / split / "JPEGImages").iterdir()):
      assert name.read_bytes() == (scene / split / "JPEGImages" / name.name).read_bytes()
  captions = [tf.train.Example.FromString(r.numpy()).features.feature["txt"].bytes_list.value[0].decode()
              for r in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(str(scene / "train-*"))))]
  assert all(any(w in c for w in synthetic.TEXTURE_WORDS) for c in captions)
  for bad in (1.5, -0.5):
    with pytest.raises(ValueError, match="scene_share"):
      synthetic.ensure_synthetic_data(str(tmp_path / "bad"), num_train=24, scene_share=bad)
  assert not (tmp_path / "bad").exists()


def test_training_records_are_the_same_bytes_in_every_process():
  # ensure_synthetic_data's promise (every host writes the same bytes) across processes whose string hashes differ:
  # protobuf's default map order follows them, so the records' bytes did.
  code = ("import hashlib; from mixreorg_jax.data import preprocess; "
          "print(hashlib.sha256(preprocess.make_example({'jpg': b'1', 'txt': 'a circle', 'nouns': ['circle', 'x']})"
          ").hexdigest())")
  digests = {subprocess.run([sys.executable, "-c", code], cwd=common.REPO, check=True, capture_output=True, text=True,
                            env=dict(common.SUBPROCESS_ENV, PYTHONHASHSEED=str(seed))
                            ).stdout.strip().splitlines()[-1] for seed in (1, 2, 3)}
  assert len(digests) == 1, digests
