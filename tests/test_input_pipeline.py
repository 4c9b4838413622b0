"""The training input pipeline on shards the tests write: batches, corrupt records, mixing, sharding, resume."""
import io
import os

import jax
import ml_collections
import numpy as np
import psutil
import pytest
import tensorflow as tf
from PIL import Image

from mixreorg_jax.data import input_pipeline, pixels, preprocess, synthetic

# Distinct captions made of words the shipped SentencePiece model knows (digits would all become unk).
CAPTIONS = [f"a {colour} {shape}" for shape, (colour, _) in synthetic.CLASS_COLOURS.items()
            for _ in range(1)] + [f"the {adj} {shape}" for adj in synthetic.ADJECTIVES
                                  for shape in synthetic.CLASS_NAMES[1:]]


def _config(data_dir, **overrides):
  c = ml_collections.ConfigDict(dict(
      batch_size=8, image_size=32, data_dir=str(data_dir), synthetic_dir="", datasets=(), image_key="jpg",
      text_key="txt", nouns_key="nouns", tokenizer="sentencepiece", tokenizer_path="", context_length=12,
      num_nouns=0, prompt_templates=("a photo of a {}.",), shuffle_buffer=0, crop_scale=(0.5, 1.0),
      color_jitter=0.0, seed=0, deterministic=True, num_parallel_calls=2))
  c.update(overrides)
  return c


def _encode(array, fmt="JPEG", **kw):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt, **kw)
  return buf.getvalue()


def _image(i, size=24):
  rng = np.random.default_rng(i)
  return rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)


def _write(path, records):
  with tf.io.TFRecordWriter(str(path)) as w:
    for r in records:
      w.write(preprocess.make_example(r))


def _good(i, caption=None):
  return {"jpg": _encode(_image(i)), "txt": caption or CAPTIONS[i % len(CAPTIONS)], "nouns": ["picture"]}


def _all_batches(it, n):
  return [next(it) for _ in range(n)]


def test_batches_have_the_documented_shapes_and_dtypes(tmp_path):
  _write(tmp_path / "a.tfrecord", [_good(i) for i in range(20)])
  it = input_pipeline.make_train_iterator(_config(tmp_path, num_nouns=3), 0, 1)
  b = next(it)
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["text"].shape == (8, 12) and b["text"].dtype == np.int32
  assert b["nouns"].shape == (8, 3, 12) and b["nouns"].dtype == np.int32
  # CLIP normalisation: a [0, 255] image maps into [-mean/std, (1-mean)/std].
  lo = -np.array(pixels.CLIP_MEAN) / np.array(pixels.CLIP_STD)
  assert b["image"].min() >= lo.min() - 1e-4 and b["image"].max() <= 2.2
  eot = it.tokenizer.eot_id
  assert ((b["text"] == eot).sum(axis=1) == 1).all() and ((b["nouns"] == eot).sum(axis=2) == 1).all()
  # One noun ("picture") -> GroupViT fill: two caption slots then the prompted noun.
  np.testing.assert_array_equal(b["nouns"][:, 0], b["text"])
  prompt = it.tokenizer.tokenize_numpy(["a photo of a picture."])[0]
  np.testing.assert_array_equal(b["nouns"][:, 2], np.broadcast_to(prompt, (8, 12)))


def test_noun_prompts_can_be_shorter_than_captions_and_keep_their_eot(tmp_path):
  _write(tmp_path / "a.tfrecord", [_good(i) for i in range(20)])
  it = input_pipeline.make_train_iterator(_config(tmp_path, num_nouns=3, noun_context_length=8), 0, 1)
  b = next(it)
  assert b["text"].shape == (8, 12) and b["nouns"].shape == (8, 3, 8)
  eot = it.tokenizer.eot_id
  assert ((b["nouns"] == eot).sum(axis=2) == 1).all()
  prompt = it.tokenizer.tokenize_numpy(["a photo of a picture."])[0]
  assert (prompt[8:] == 0).all()  # the prompt fits in 8 tokens: it is not cut
  np.testing.assert_array_equal(b["nouns"][:, 2], np.broadcast_to(prompt[:8], (8, 8)))
  # Caption fill slots are the caption's first ids, ended by eot where it was cut off.
  for caption, filled in zip(b["text"], b["nouns"][:, 0]):
    cut = (caption[:8] != eot).all()
    np.testing.assert_array_equal(filled[:7], caption[:7])
    assert filled[7] == (eot if cut else caption[7])


def _corrupt_records():
  good = _image(0)
  truncated = _encode(good)[:200]
  huge = bytearray(_encode(good))
  sof = huge.index(b"\xff\xc0")
  huge[sof + 5:sof + 9] = (30000).to_bytes(2, "big") * 2
  return {
      "truncated": {"jpg": truncated, "txt": "a truncated jpeg"},
      "unknown_format": {"jpg": np.random.default_rng(1).bytes(3000), "txt": "random bytes"},
      "empty_image": {"jpg": b"", "txt": "zero bytes"},
      "too_small": {"jpg": _encode(np.zeros((1, 1, 3), np.uint8), "PNG"), "txt": "one pixel"},
      "too_large": {"jpg": bytes(huge), "txt": "a 30000x30000 header"},
      "empty_caption": {"jpg": _encode(good), "txt": "   "},
      "bad_caption_utf8": {"jpg": _encode(good), "txt": b"\xff\xfe\xfa not utf-8"},
  }


def test_corrupt_records_are_skipped_and_counted_by_reason(tmp_path):
  bad = _corrupt_records()
  records, good_captions = [], []
  for i in range(24):
    records.append(_good(i))
    good_captions.append(CAPTIONS[i])
    if i % 3 == 0:
      records.append(list(bad.values())[(i // 3) % len(bad)])
  records.append({"jpg": _encode(_image(99), "PNG"), "txt": "a red square"})  # PNG, RGBA, grey, GIF
  records.append({"jpg": _encode(np.dstack([_image(98), np.full((24, 28, 1), 200, np.uint8)]), "PNG"),
                  "txt": "a blue star"})
  records.append({"jpg": _encode(_image(97)[..., 0], "PNG"), "txt": "a green ring"})
  records.append({"jpg": _encode(_image(96), "GIF"), "txt": "a pink cross"})
  good_captions += ["a red square", "a blue star", "a green ring", "a pink cross"]
  _write(tmp_path / "mixed.tfrecord", records)
  rss0 = psutil.Process().memory_info().rss
  cfg = _config(tmp_path, batch_size=28)
  ds = input_pipeline.make_train_dataset(cfg, process_index=0, process_count=1)
  it = input_pipeline.TrainIterator(ds, None)
  batch = next(it)  # exactly one pass over the file: 28 good records
  kinds = [list(bad)[(i // 3) % len(bad)] for i in range(0, 24, 3)]
  assert it.skipped() == {r: kinds.count(r) for r in preprocess.REASONS[1:]}
  want = input_pipeline.tokenizers.make_tokenizer(cfg).tokenize_numpy(good_captions)
  np.testing.assert_array_equal(np.sort(batch["text"], axis=0), np.sort(want, axis=0))
  assert psutil.Process().memory_info().rss - rss0 < 600 * 2 ** 20  # a decoded 30000^2 image would be 2.7 GB


def test_decode_errors_past_the_header_checks_are_counted(tmp_path):
  # A JPEG whose header and end marker are intact but whose entropy data is garbage fails in the decoder.
  jpg = bytearray(_encode(_image(5)))
  sos = jpg.index(b"\xff\xda")
  for j in range(sos + 2, sos + 6):  # corrupt the SOS header length/components
    jpg[j] = 0xEE
  records = [_good(0), {"jpg": bytes(jpg), "txt": "broken scan"}, _good(1), _good(2), _good(3)]
  _write(tmp_path / "d.tfrecord", records)
  it = input_pipeline.make_train_iterator(_config(tmp_path, batch_size=4), 0, 1)
  next(it)
  assert it.skipped()["decode_error"] == 1 and sum(it.skipped().values()) == 1


def test_truncated_and_corrupt_files_are_read_to_the_damage_counted_and_logged(tmp_path, caplog):
  """A file cut mid-record and one with a flipped byte in its 4th record: their intact records are used, each is
  counted once per pass in "corrupt_file" and logged with its path, and the batches keep coming."""
  for name, first in (("good", 0), ("truncated", 10), ("corrupt", 20)):
    _write(tmp_path / f"{name}.tfrecord", [_good(first + i, caption=CAPTIONS[first + i]) for i in range(6)])
  data = (tmp_path / "truncated.tfrecord").read_bytes()
  (tmp_path / "truncated.tfrecord").write_bytes(data[:len(data) * 3 // 4])  # the 5th record is cut.
  data = bytearray((tmp_path / "corrupt.tfrecord").read_bytes())
  data[len(data) // 2] ^= 0xFF  # inside the 4th record: the 4th to 6th are lost.
  (tmp_path / "corrupt.tfrecord").write_bytes(bytes(data))
  # 6 + 4 + 3 = 13 intact records per pass over the files.
  it = input_pipeline.make_train_iterator(_config(tmp_path, batch_size=13), 0, 1)
  with caplog.at_level("WARNING"):
    batches = _all_batches(it, 3)  # three passes' worth: files of consecutive passes interleave.
  assert it.skipped()["corrupt_file"] >= 4 and sum(it.skipped().values()) == it.skipped()["corrupt_file"]
  want = [CAPTIONS[i] for i in list(range(6)) + list(range(10, 14)) + list(range(20, 23))]
  tokens = input_pipeline.tokenizers.make_tokenizer(_config(tmp_path)).tokenize_numpy(want)
  seen = np.unique(np.concatenate([b["text"] for b in batches]), axis=0)
  np.testing.assert_array_equal(seen, np.unique(tokens, axis=0))  # every intact record, nothing past the damage.
  warned = [r.getMessage() for r in caplog.records if "Skipped the rest of" in r.getMessage()]
  assert sorted(w.split()[4].rstrip(":") for w in warned) == [str(tmp_path / f"{n}.tfrecord")
                                                               for n in ("corrupt", "truncated")]  # once each.


def test_wrong_feature_key_names_the_config_key(tmp_path):
  _write(tmp_path / "a.tfrecord", [_good(0)])
  with pytest.raises(KeyError, match="config.input.image_key"):
    input_pipeline.make_train_iterator(_config(tmp_path, image_key="image"), 0, 1)
  with pytest.raises(FileNotFoundError, match="config.input.data_dir"):
    input_pipeline.make_train_iterator(_config(tmp_path / "missing"), 0, 1)


def test_weighted_mixture_respects_the_weights(tmp_path):
  for name in ("a", "b"):
    os.makedirs(tmp_path / name)
    _write(tmp_path / name / "s.tfrecord", [_good(i, caption=f"the {name} circle") for i in range(6)])
  datasets = ({"name": "a", "pattern": str(tmp_path / "a"), "weight": 3.0},
              {"name": "b", "pattern": str(tmp_path / "b" / "*.tfrecord"), "weight": 1.0})
  cfg = _config("", datasets=datasets, batch_size=50, image_size=16)
  it = input_pipeline.make_train_iterator(cfg, 0, 1)
  a_ids = it.tokenizer.tokenize_numpy(["the a circle"])[0]
  texts = np.concatenate([b["text"] for b in _all_batches(it, 8)])
  frac = (texts == a_ids).all(axis=1).mean()
  assert abs(frac - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(texts))  # 4 sigma over 400 draws


def test_hosts_read_disjoint_files(tmp_path):
  for s in range(4):
    _write(tmp_path / f"s{s}.tfrecord", [_good(i, caption=CAPTIONS[s]) for i in range(4)])
  files = input_pipeline.list_files(str(tmp_path), "config.input.data_dir")
  shares = [input_pipeline.host_files(files, p, 2, "k") for p in range(2)]
  assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == files
  seen = []
  for p in range(2):
    it = input_pipeline.make_train_iterator(_config(tmp_path, batch_size=16), p, 2)
    texts = np.concatenate([b["text"] for b in _all_batches(it, 2)])
    seen.append({tuple(t) for t in texts})
    assert texts.shape[0] == 16  # host batch = global batch / hosts
  assert len(seen[0]) == 2 and len(seen[1]) == 2 and not seen[0] & seen[1]


def test_resume_continues_with_exactly_the_next_batch(tmp_path):
  _write(tmp_path / "a.tfrecord", [_good(i) for i in range(13)])
  _write(tmp_path / "b.tfrecord", [_good(100 + i) for i in range(11)])
  cfg = _config(tmp_path, shuffle_buffer=7, color_jitter=0.3, num_nouns=2, crop_scale=(0.08, 1.0))
  ref = input_pipeline.make_train_iterator(cfg, 0, 1)
  _all_batches(ref, 5)
  path = ref.save_state(str(tmp_path / "ckpt" / "input"))
  want = _all_batches(ref, 4)
  restored = input_pipeline.make_train_iterator(cfg, 0, 1)
  restored.restore_state(path)
  for w, g in zip(want, _all_batches(restored, 4)):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  # Same seed -> same stream from the start (deterministic mode).
  a, b = (next(input_pipeline.make_train_iterator(cfg, 0, 1)) for _ in range(2))
  np.testing.assert_array_equal(a["image"], b["image"])


def test_tfds_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(24, 28, 3)), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        yield i, {"image": _image(i), "caption": CAPTIONS[i]}

  TinyCaptions(data_dir=str(tmp_path)).download_and_prepare()
  datasets = ({"name": "tiny", "tfds_name": "tiny_captions", "split": "train", "tfds_data_dir": str(tmp_path),
               "image_key": "image", "text_key": "caption"},)
  it = input_pipeline.make_train_iterator(_config("", datasets=datasets, batch_size=6), 0, 1)
  b = next(it)
  want = it.tokenizer.tokenize_numpy(CAPTIONS[:6])
  np.testing.assert_array_equal(np.sort(b["text"], axis=0), np.sort(want, axis=0))


def test_global_batch_and_device_prefetch(tmp_path):
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batches = [{"image": np.full((8, 4, 4, 3), i, np.float32), "text": np.full((8, 5), i, np.int32)} for i in range(3)]
  out = list(input_pipeline.prefetch_to_device(iter(batches), spec, size=2))
  assert len(out) == 3 and out[2]["image"].shape == (8, 4, 4, 3) and out[2]["image"].sharding == spec
  np.testing.assert_array_equal(np.asarray(out[1]["text"]), batches[1]["text"])
