"""make_shards: webdataset tars, image folders with caption files and TFDS into TFRecords; nouns; reruns."""
import io
import json
import tarfile

import numpy as np
import tensorflow as tf
from PIL import Image

from mixreorg_jax.data import nouns
from mixreorg_jax.tools import make_shards
from tests import helpers


def _img(fmt="JPEG", size=(20, 16), seed=0):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, fmt)
  return buf.getvalue()


def _read(out_dir):
  rows = []
  for path in sorted(tf.io.gfile.glob(str(out_dir / "train-*.tfrecord"))):
    for r in tf.data.TFRecordDataset(path):
      f = tf.train.Example.FromString(r.numpy()).features.feature
      rows.append((f["txt"].bytes_list.value[0].decode(), [n.decode() for n in f["nouns"].bytes_list.value]))
  return rows


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_with_txt_and_json_captions(tmp_path):
  with tarfile.open(tmp_path / "00000.tar", "w") as tar:
    _add(tar, "a/0001.jpg", _img())
    _add(tar, "a/0001.txt", b"a dog on the grass")
    _add(tar, "a/0002.png", _img("PNG", seed=1))
    _add(tar, "a/0002.json", json.dumps({"caption": "a cat near a window"}).encode())
    _add(tar, "a/0003.webp", _img("WEBP", seed=2))
    _add(tar, "a/0003.txt", b"a bird in the sky")
  with tarfile.open(tmp_path / "00001.tar", "w") as tar:
    _add(tar, "0004.jpg", _img()[:60])  # truncated
    _add(tar, "0004.txt", b"broken")
    _add(tar, "0005.jpg", _img(seed=3))  # no caption
    _add(tar, "0006.jpg", _img(seed=4))
    _add(tar, "0006.txt", b"\xff\xfe")
  summary = make_shards.write_shards(make_shards.read_webdataset(str(tmp_path / "{00000..00001}.tar")),
                                     str(tmp_path / "out"), num_shards=2)
  assert summary["written"] == 3
  assert summary["skipped"] == {"bad_caption_utf8": 1, "decode_error": 1, "missing": 1}
  rows = dict(_read(tmp_path / "out"))
  assert set(rows) == {"a dog on the grass", "a cat near a window", "a bird in the sky"}
  assert "dog" in rows["a dog on the grass"] and "cat" in rows["a cat near a window"]


def test_image_folder_with_csv_and_jsonl_and_rerun_skips_complete_shards(tmp_path):
  (tmp_path / "img").mkdir()
  for i in range(5):
    (tmp_path / "img" / f"{i}.jpg").write_bytes(_img(seed=i))
  (tmp_path / "img" / "tiny.png").write_bytes(_img("PNG", size=(1, 1)))
  (tmp_path / "c.csv").write_text("file,caption\n" + "".join(f"{i}.jpg,a red ball number {i}\n" for i in range(5))
                                  + "tiny.png,a speck\nmissing.jpg,gone\n3.jpg,\n")
  out = tmp_path / "out"
  s = make_shards.write_shards(make_shards.read_image_folder(str(tmp_path / "img"), str(tmp_path / "c.csv")),
                               str(out), num_shards=3)
  assert s["written"] == 5 and s["skipped"] == {"empty_caption": 1, "missing": 1, "too_small": 1}
  assert s["shards_written"] == 3 and len(_read(out)) == 5
  first = (out / "train-00000-of-00003.tfrecord").stat().st_mtime_ns
  (out / "train-00002-of-00003.tfrecord").unlink()
  s = make_shards.write_shards(make_shards.read_image_folder(str(tmp_path / "img"), str(tmp_path / "c.csv")),
                               str(out), num_shards=3)
  assert (s["shards_written"], s["shards_skipped_complete"]) == (1, 2)
  assert (out / "train-00000-of-00003.tfrecord").stat().st_mtime_ns == first and len(_read(out)) == 5
  assert json.loads((out / "train-summary.json").read_text())["written"] == 5
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"image": f"{i}.jpg", "text": f"a cup {i}"})
                                              for i in range(2)))
  s = make_shards.write_shards(make_shards.read_image_folder(str(tmp_path / "img"), str(tmp_path / "c.jsonl")),
                               str(tmp_path / "out2"), num_shards=1)
  assert s["written"] == 2


def test_command_line_on_tfds(tmp_path, capsys):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyPairs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(16, 20, 3)), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"image": np.full((16, 20, 3), 40 * i, np.uint8), "caption": f"a house {i}"}

  TinyPairs(data_dir=str(tmp_path / "tfds")).download_and_prepare()
  helpers.run_tool_main(make_shards, out=str(tmp_path / "out"), num_shards=2, tfds="tiny_pairs",
                        tfds_data_dir=str(tmp_path / "tfds"))
  assert "written 4 records into 2 shards" in capsys.readouterr().out
  assert sorted(t for t, _ in _read(tmp_path / "out")) == [f"a house {i}" for i in range(4)]


def test_nouns_without_network():
  got = nouns.extract_nouns("A photo of a red circle and a blue square on a striped background.", backend="lexicon")
  assert got == ["circle", "square", "background"]
  assert nouns.extract_nouns("the man is riding a bike down the street", backend="lexicon") == [
      "man", "bike", "street"]
