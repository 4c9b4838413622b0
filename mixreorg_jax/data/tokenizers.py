"""Text tokenizers with CLIP-style output: [bos] tokens ... [eot] then pad, int32 [n, context_length].

Truncation keeps [eot] as the last token, so every row holds eot_id exactly once (the text tower pools there).

* `SentencePieceTokenizer`: in-graph through tensorflow-text. The default model, assets/synthetic_spm.model, is
  fitted to the synthetic captions (assets/README.md has the command); ids pad=0, bos=1, eot=2, unk=3.
* `ClipBpeTokenizer`: CLIP's byte-level BPE on `bpe_simple_vocab_16e6.txt.gz`, giving the same ids as
  `transformers.CLIPTokenizer` (NFC, whitespace collapsed, lower case, CLIP's split pattern, byte-level BPE with
  `</w>` word ends); bos 49406, eot 49407, pad 0. It runs as Python inside tf.data (tf.numpy_function) with a
  per-word cache; it is meant for converted GroupViT weights, the SentencePiece path is the fast one.
  `python -m mixreorg_jax.tools.clip_vocab` puts the vocab into DEFAULT_CLIP_VOCAB.
"""
import functools
import gzip
import os
import types
import unicodedata
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")
DEFAULT_SPM_MODEL = os.path.join(ASSETS_DIR, "synthetic_spm.model")
CLIP_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
CACHE_DIR = os.environ.get("MIXREORG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mixreorg_jax"))
DEFAULT_CLIP_VOCAB = os.path.join(CACHE_DIR, CLIP_VOCAB_NAME)


def pack_ids(ids: tf.RaggedTensor, context_length: int, bos_id: int, eot_id: int, pad_id: int) -> tf.Tensor:
  """Ragged token ids [n, (k)] -> int32 [n, L]: bos, ids[:L-2], eot, pad... (eot kept when truncating)."""
  ids = tf.cast(ids[:, :context_length - 2], tf.int32)
  n = ids.nrows()
  bos = tf.fill([n, 1], tf.constant(bos_id, tf.int32))
  eot = tf.fill([n, 1], tf.constant(eot_id, tf.int32))
  row = tf.concat([bos, ids, eot], axis=1)
  return row.to_tensor(default_value=pad_id, shape=[None, context_length])


def truncate_tokens(tokens: tf.Tensor, length: int, eot_id: int) -> tf.Tensor:
  """Packed ids int32 [n, L] -> [n, length] (length <= L): the first `length` ids, with the last one replaced by
  eot in rows whose eot was cut off, so every row still ends its text with eot (the pooled position)."""
  short = tokens[:, :length]
  has_eot = tf.reduce_any(tf.equal(short, eot_id), axis=1, keepdims=True)
  last = tf.where(has_eot, short[:, -1:], tf.fill(tf.shape(short[:, -1:]), tf.constant(eot_id, short.dtype)))
  return tf.concat([short[:, :-1], last], axis=1)


class SentencePieceTokenizer:
  """In-graph SentencePiece (tensorflow-text). tokenize(strings [n]) -> int32 [n, L]."""

  def __init__(self, model_path: str, context_length: int):
    import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(model_path):
      raise FileNotFoundError(f"SentencePiece model {model_path!r} not found; set config.input.tokenizer_path "
                              "('' = the shipped synthetic model).")
    with tf.io.gfile.GFile(model_path, "rb") as f:
      self._model = f.read()
    self._sp = tf_text.SentencepieceTokenizer(model=self._model, add_bos=False, add_eos=False)
    self.context_length = context_length
    self.vocab_size = int(self._sp.vocab_size())
    self.pad_id, self.bos_id, self.eot_id = self._special_ids()

  def _special_ids(self):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    proc = spm.SentencePieceProcessor(model_proto=self._model)
    pad, bos, eos = proc.pad_id(), proc.bos_id(), proc.eos_id()
    if min(pad, bos, eos) < 0:
      raise ValueError("config.input.tokenizer_path: the SentencePiece model needs pad, bos and eos ids; train it "
                       "with --pad_id=0 --bos_id=1 --eos_id=2 --unk_id=3 (see mixreorg_jax/data/assets/README.md).")
    return pad, bos, eos

  def tokenize(self, texts: tf.Tensor) -> tf.Tensor:
    """texts: tf.string [n] -> int32 [n, context_length]."""
    return pack_ids(self._sp.tokenize(texts), self.context_length, self.bos_id, self.eot_id, self.pad_id)

  def tokenize_numpy(self, texts: Sequence[str]) -> np.ndarray:
    return self.tokenize(tf.constant(list(texts), tf.string)).numpy()


# ---------------------------------------------------------------------------------------------- CLIP BPE


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> Dict[int, str]:
  """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def read_clip_bpe(path: str):
  """Vocabulary list and merge ranks from CLIP's gzipped merges file (the first line is a header)."""
  with tf.io.gfile.GFile(path, "rb") as f:
    lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1] if line.strip()]
  base = list(byte_to_unicode().values())
  vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  return vocab, merges


class ClipBpeTokenizer:
  """CLIP's byte-level BPE (ids as transformers.CLIPTokenizer). tokenize(strings [n]) -> int32 [n, L]."""

  _PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
              r"""[^\s\p{L}\p{N}]+""")

  def __init__(self, vocab_path: str, context_length: int):
    import regex  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(vocab_path):
      raise FileNotFoundError(
          f"CLIP BPE vocab {vocab_path!r} not found; run `python -m mixreorg_jax.tools.clip_vocab` once (with "
          "PyPI access) or set config.input.tokenizer_path to a bpe_simple_vocab_16e6.txt.gz.")
    vocab, merges = read_clip_bpe(vocab_path)
    self.encoder = {tok: i for i, tok in enumerate(vocab)}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self._split = regex.compile(self._PATTERN)
    self._ws = regex.compile(r"\s+")
    self._cache = {"<|startoftext|>": [self.encoder["<|startoftext|>"]],
                   "<|endoftext|>": [self.encoder["<|endoftext|>"]]}
    self.context_length = context_length
    self.vocab_size = len(vocab)
    self.bos_id = self.encoder["<|startoftext|>"]
    self.eot_id = self.encoder["<|endoftext|>"]
    self.pad_id = 0

  def _bpe(self, word: str) -> List[int]:
    """Byte-level BPE of one pre-token (its characters already mapped through byte_to_unicode)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      pairs = [(self.ranks.get((a, b), np.inf), i) for i, (a, b) in enumerate(zip(parts[:-1], parts[1:]))]
      rank, i = min(pairs)
      if rank == np.inf:
        break
      first, second = parts[i], parts[i + 1]
      merged, j = [], 0
      while j < len(parts):  # merge every occurrence of the best pair, left to right
        if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
          merged.append(first + second)
          j += 2
        else:
          merged.append(parts[j])
          j += 1
      parts = merged
    return [self.encoder[p] for p in parts]

  def encode(self, text: str) -> List[int]:
    """Token ids of one string, without bos/eot."""
    text = self._ws.sub(" ", unicodedata.normalize("NFC", text)).lower()
    table = byte_to_unicode()
    ids = []
    for piece in self._split.findall(text):
      if piece not in self._cache:
        self._cache[piece] = self._bpe("".join(table[b] for b in piece.encode("utf-8")))
      ids.extend(self._cache[piece])
    return ids

  def tokenize_numpy(self, texts: Sequence) -> np.ndarray:
    """list of str (or bytes) [n] -> int32 [n, context_length]."""
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    for row, t in enumerate(texts):
      t = t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t
      ids = [self.bos_id] + self.encode(t)[:self.context_length - 2] + [self.eot_id]
      out[row, :len(ids)] = ids
    return out

  def tokenize(self, texts: tf.Tensor) -> tf.Tensor:
    """texts: tf.string [n] -> int32 [n, context_length] (Python BPE inside the graph)."""
    ids = tf.numpy_function(lambda t: self.tokenize_numpy(list(t.reshape(-1))), [texts], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [None, self.context_length])


def make_tokenizer(input_config):
  """The tokenizer named by config.input.tokenizer ('sentencepiece' | 'clip_bpe'), path from input.tokenizer_path."""
  kind, path, length = input_config.tokenizer, input_config.tokenizer_path, input_config.context_length
  if length < 2:
    raise ValueError(f"config.input.context_length={length}: needs room for bos and eot (>= 2).")
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path or DEFAULT_SPM_MODEL, length)
  if kind == "clip_bpe":
    return ClipBpeTokenizer(path or DEFAULT_CLIP_VOCAB, length)
  raise ValueError(f"config.input.tokenizer={kind!r}: expected 'sentencepiece' or 'clip_bpe'.")


def checkpoint_tokenizer(block: Optional[Dict[str, Any]]):
  """The tokenizer of a checkpoint's model_config.json "tokenizer" block (InferenceModel.tokenizer)."""
  if block is None:
    raise ValueError("The checkpoint's model_config.json has no 'tokenizer' block; re-export it with "
                     "checkpoint_io.save_inference_checkpoint(..., tokenizer=checkpoint_io.tokenizer_info(...)).")
  return make_tokenizer(types.SimpleNamespace(tokenizer=block["kind"], tokenizer_path=block["path"],
                                            context_length=block["context_length"]))


def train_sentencepiece(texts: Sequence[str], model_prefix: str, vocab_size: int) -> str:
  """Fits a SentencePiece BPE model with the ids this project expects; returns the .model path."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
      pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False, character_coverage=1.0,
      normalization_rule_name="nmt_nfkc_cf", num_threads=1, minloglevel=2)
  return model_prefix + ".model"
