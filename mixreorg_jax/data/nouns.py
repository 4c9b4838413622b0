"""Noun extraction for GroupViT's multi-label loss, run once when shards are made (never at training time).

Works offline: NLTK's perceptron tagger when NLTK and its tagger data are installed; otherwise the lexicon that
the `lemminflect` wheel ships (a word counts as a noun when the lexicon knows it as one and, if it is also a
verb or adjective, the word before it is a determiner, number, adjective or possessive, and an adjective
reading does not modify a following noun).
"""
import functools
import re
from typing import Callable, List

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_STOP = frozenset("a an the this that these those my your his her its our their some any no every each of in on at "
                  "to for with by from and or but is are was were be been being it there here which who what "
                  "photo picture image".split())
_DETERMINERS = frozenset("a an the this that these those my your his her its our their some any no every each two "
                         "three four many several one".split())


@functools.lru_cache(maxsize=1)
def _nltk_tagger():
  try:
    import nltk  # pylint: disable=g-import-not-at-top
    nltk.pos_tag(["test"])  # raises LookupError when the tagger data is missing
    return nltk.pos_tag
  except Exception:  # pylint: disable=broad-except
    return None


def _nouns_nltk(pos_tag: Callable, words: List[str]) -> List[str]:
  return [w for w, tag in pos_tag(words) if tag.startswith("NN")]


def _nouns_lexicon(words: List[str]) -> List[str]:
  import lemminflect  # pylint: disable=g-import-not-at-top
  out = []
  for i, w in enumerate(words):
    pos = lemminflect.getAllLemmas(w)
    if "NOUN" not in pos:
      continue
    prev = words[i - 1] if i else ""
    prev_pos = lemminflect.getAllLemmas(prev) if prev else {}
    ambiguous = len(pos) > 1
    nxt = words[i + 1] if i + 1 < len(words) else ""
    if "ADJ" in pos and nxt and "NOUN" in lemminflect.getAllLemmas(nxt):
      continue  # "red circle": an adjective before a noun
    if len(w) <= 2:
      continue
    if not ambiguous or prev in _DETERMINERS or "ADJ" in prev_pos or prev.endswith("'s"):
      out.append(w)
  return out


def extract_nouns(caption: str, backend: str = "auto") -> List[str]:
  """The distinct nouns of a caption, lower case, in order. backend: 'auto' | 'nltk' | 'lexicon'."""
  words = _WORD.findall(caption.lower())
  tagger = _nltk_tagger() if backend in ("auto", "nltk") else None
  if backend == "nltk" and tagger is None:
    raise RuntimeError("NLTK or its averaged_perceptron_tagger data is not installed; use backend='lexicon'.")
  found = _nouns_nltk(tagger, words) if tagger else _nouns_lexicon(words)
  seen, out = set(), []
  for w in found:
    if w not in _STOP and w not in seen:
      seen.add(w)
      out.append(w)
  return out
