"""Tokenizers: CLIP-style packing (bos ... eot pad), SentencePiece in-graph, CLIP BPE parity with transformers."""
import collections
import gzip
import os
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from mixreorg_jax.data import tokenizers
from mixreorg_jax.tools import clip_vocab

TRICKY = [
    "A photo of a Dog.", "HELLO   world\t\nagain", "don't STOP believin' — it's 3:45pm!!", "naïve café résumé",
    "Ünïcödé ß straße ǅ", "emoji 🐶🐱 and ✨sparkles✨", "日本語のテキスト and 中文", "tabs\tand\r\nnewlines",
    "numbers 1234567890 3.14159", "punctuation ...?!;:()[]{}<>@#$%^&*_+=~`|\\/", "",
    "a very long caption " * 40, "Mixed-CASE Hyphen-ated words' and 'quotes'", "x",
]


def _config(kind, path="", length=77):
  return ml_collections.ConfigDict(dict(tokenizer=kind, tokenizer_path=path, context_length=length))


def test_pack_ids_keeps_eot_when_truncating():
  ids = tf.ragged.constant([[5, 6, 7, 8, 9], [5], []])
  out = tokenizers.pack_ids(ids, 5, bos_id=1, eot_id=2, pad_id=0).numpy()
  np.testing.assert_array_equal(out, [[1, 5, 6, 7, 2], [1, 5, 2, 0, 0], [1, 2, 0, 0, 0]])


def test_sentencepiece_in_graph_matches_python_and_has_one_eot():
  tok = tokenizers.make_tokenizer(_config("sentencepiece", length=8))
  assert (tok.pad_id, tok.bos_id, tok.eot_id) == (0, 1, 2) and tok.vocab_size <= 512
  texts = ["a photo of a red circle and a blue square on a striped background.", "a star", ""]
  fn = tf.function(tok.tokenize)
  graph = fn(tf.constant(texts)).numpy()
  np.testing.assert_array_equal(graph, tok.tokenize_numpy(texts))
  assert graph.shape == (3, 8) and ((graph == tok.eot_id).sum(1) == 1).all() and (graph[:, 0] == 1).all()
  assert graph[0, -1] == tok.eot_id  # truncated row still ends in eot
  np.testing.assert_array_equal(graph[2], [1, 2, 0, 0, 0, 0, 0, 0])


def test_unknown_tokenizer_names_the_config_key():
  with pytest.raises(ValueError, match="config.input.tokenizer"):
    tokenizers.make_tokenizer(_config("wordpiece"))


def _learn_merges(words, num):
  """A tiny BPE learner (test fixture): most frequent adjacent pair first, CLIP's </w> word ends."""
  table = tokenizers.byte_to_unicode()
  corpus = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",)
                               for w in ("".join(table[b] for b in word.encode()) for word in words))
  merges = []
  for _ in range(num):
    pairs = collections.Counter()
    for word, n in corpus.items():
      for pair in zip(word[:-1], word[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    new = collections.Counter()
    for word, n in corpus.items():
      out, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      new[tuple(out)] += n
    corpus = new
  return merges


def _small_vocab_file(path):
  words = " ".join(TRICKY[:11] + ["the quick brown fox jumps over the lazy dog"] * 3).lower().split()
  merges = _learn_merges(words, 150)
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: test\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  return str(path)


@pytest.fixture(params=["small", "clip"])
def vocab_path(request, tmp_path):
  if request.param == "small":
    return _small_vocab_file(tmp_path / "small_vocab.txt.gz")
  from mixreorg_jax.tools import clip_vocab  # noqa: PLC0415
  try:  # the real vocab: cached, or fetched once from PyPI (the open_clip_torch wheel, no torch)
    return clip_vocab.ensure_clip_vocab()
  except Exception as e:  # noqa: BLE001  only a machine without PyPI access gets here
    pytest.skip(f"the CLIP vocab is not cached and could not be fetched from PyPI: {e}")


def test_clip_bpe_ids_equal_transformers(vocab_path):
  transformers = pytest.importorskip("transformers")
  vocab, merges = tokenizers.read_clip_bpe(vocab_path)
  reference = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=list(merges))
  ours = tokenizers.ClipBpeTokenizer(vocab_path, context_length=77)
  assert (ours.bos_id, ours.eot_id) == (reference.bos_token_id, reference.eos_token_id)
  if vocab_path == tokenizers.DEFAULT_CLIP_VOCAB:
    assert (ours.bos_id, ours.eot_id, ours.vocab_size) == (49406, 49407, 49408)
  got = ours.tokenize_numpy(TRICKY)
  for text, row in zip(TRICKY, got):
    ids = reference(text, truncation=True, max_length=77)["input_ids"]
    want = np.zeros(77, np.int32)
    want[:len(ids)] = ids
    np.testing.assert_array_equal(row, want, err_msg=repr(text))
    assert (row == ours.eot_id).sum() == 1
  np.testing.assert_array_equal(ours.tokenize(tf.constant(TRICKY)).numpy(), got)  # the in-graph path


def test_clip_vocab_helper_extracts_from_a_wheel(tmp_path):
  payload = gzip.compress(b"#version: 0.2\na b\n")
  wheel = tmp_path / "open_clip_torch-0.0.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr(clip_vocab.MEMBER, payload)
  out = clip_vocab.ensure_clip_vocab(str(tmp_path / "cache" / "vocab.txt.gz"), wheel=str(wheel))
  with open(out, "rb") as f:
    assert f.read() == payload
  assert clip_vocab.ensure_clip_vocab(out) == out  # cached: no download attempted
