"""Converts image-caption data into TFRecord shards (tf.train.Example: jpg, txt, nouns) for the input pipeline.

  python -m mixreorg_jax.tools.make_shards --out=DIR --num_shards=N SOURCE
  SOURCE is one of
    --webdataset='shards/{00000..00099}.tar' or a glob   (GroupViT's format: key.jpg|png|webp + key.txt|json)
    --image_dir=DIR --captions=FILE.csv|tsv|jsonl        (columns: file name + caption; see --file_column)
    --tfds=NAME [--split=train --tfds_data_dir=... --image_key=image --text_key=caption]

Every record is checked (opens as an image, sane size, UTF-8 non-empty caption) and the nouns of its caption are
stored (mixreorg_jax.data.nouns). Example i goes to shard i mod N; a shard is written as a temporary file and
renamed when done, so a rerun skips the shards that are complete. A summary (written, skipped and why) is
printed and saved as DIR/<prefix>-summary.json.
"""
import collections
import csv
import glob
import io
import json
import os
import re
import tarfile
from typing import Dict, Iterator, Optional, Tuple

from absl import app
from absl import flags
from PIL import Image
from tqdm import tqdm

from mixreorg_jax.data import nouns as nouns_lib
from mixreorg_jax.data import preprocess

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
Record = Tuple[Optional[bytes], Optional[bytes]]  # (image bytes, caption bytes)


def _expand_braces(pattern: str):
  """'a/{000..012}.tar' -> the 13 paths (webdataset's notation); other patterns go through glob."""
  m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
  if not m:
    return sorted(glob.glob(pattern))
  lo, hi = m.group(1), m.group(2)
  return [pattern[:m.start()] + str(i).zfill(len(lo)) + pattern[m.end():] for i in range(int(lo), int(hi) + 1)]


def read_webdataset(pattern: str) -> Iterator[Record]:
  """(image, caption) pairs from webdataset tars, paired by key; a .json caption uses its 'caption' field."""
  for path in _expand_braces(pattern):
    groups = collections.OrderedDict()
    with tarfile.open(path) as tar:
      for member in tar:
        if not member.isfile():
          continue
        base = os.path.basename(member.name)
        key, ext = os.path.join(os.path.dirname(member.name), base.split(".")[0]), "." + base.split(".", 1)[-1]
        groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    for parts in groups.values():
      image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
      caption = parts.get(".txt")
      if caption is None and ".json" in parts:
        try:
          caption = str(json.loads(parts[".json"]).get("caption", "")).encode()
        except (ValueError, AttributeError):
          caption = b""
      yield image, caption


def read_image_folder(image_dir: str, captions: str, file_column: str = "", text_column: str = "") -> Iterator[Record]:
  """(image, caption) from a folder plus a CSV/TSV/JSONL caption file (first matching column names win)."""
  if captions.endswith(".jsonl"):
    with open(captions, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
  else:
    with open(captions, encoding="utf-8", newline="") as f:
      rows = list(csv.DictReader(f, delimiter="\t" if captions.endswith(".tsv") else ","))
  if not rows:
    return
  cols = list(rows[0])
  fcol = file_column or next((c for c in ("file", "filename", "image", "path", "url") if c in cols), None)
  tcol = text_column or next((c for c in ("caption", "text", "txt") if c in cols), None)
  if fcol not in cols or tcol not in cols:
    raise KeyError(f"--captions={captions}: need a file and a caption column (--file_column/--text_column), "
                   f"found {cols}.")
  for row in rows:
    path = os.path.join(image_dir, row[fcol])
    image = open(path, "rb").read() if os.path.isfile(path) else None
    yield image, (row[tcol] or "").encode("utf-8")


def read_tfds(name: str, split: str, data_dir: str, image_key: str, text_key: str) -> Iterator[Record]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir or None)
  decoders = {image_key: tfds.decode.SkipDecoding()}
  for ex in tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)):
    yield ex[image_key], ex[text_key]


def check_record(image: Optional[bytes], caption: Optional[bytes]) -> Tuple[str, str]:
  """('ok', caption text) or (reason, '') with the reasons of preprocess.REASONS plus 'missing'."""
  if image is None or caption is None:
    return "missing", ""
  if not image:
    return "empty_image", ""
  try:
    text = caption.decode("utf-8").strip()
  except UnicodeDecodeError:
    return "bad_caption_utf8", ""
  try:
    with Image.open(io.BytesIO(image)) as im:
      w, h = im.size
      if min(w, h) < preprocess.MIN_IMAGE_SIDE:
        return "too_small", ""
      if w * h > preprocess.MAX_IMAGE_PIXELS:
        return "too_large", ""
      im.load()  # full decode: catches truncated and corrupt data
  except Image.DecompressionBombError:
    return "too_large", ""
  except (OSError, SyntaxError, ValueError):
    return "decode_error", ""
  if not text:
    return "empty_caption", ""
  return "ok", text


def write_shards(records: Iterator[Record], out_dir: str, num_shards: int, prefix: str = "train",
                 with_nouns: bool = True, total: Optional[int] = None) -> Dict[str, object]:
  """Writes records round-robin into num_shards TFRecords (skipping complete ones); returns the summary."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord") for i in range(num_shards)]
  todo = {i for i, p in enumerate(paths) if not os.path.exists(p)}
  writers = {i: tf.io.TFRecordWriter(paths[i] + ".tmp") for i in todo}
  counts, written = collections.Counter(), 0
  try:
    for image, caption in tqdm(records, total=total, desc=f"{prefix} -> {out_dir}", unit="rec"):
      reason, text = check_record(image, caption)
      if reason != "ok":
        counts[reason] += 1
        continue
      shard = written % num_shards
      written += 1
      if shard in writers:
        feats = {"jpg": image, "txt": text.encode()}
        if with_nouns:
          feats["nouns"] = [w.encode() for w in nouns_lib.extract_nouns(text)]
        writers[shard].write(preprocess.make_example(feats))
  finally:
    for w in writers.values():
      w.close()
  for i in todo:
    os.replace(paths[i] + ".tmp", paths[i])
  summary = dict(written=written, skipped=dict(sorted(counts.items())), skipped_total=sum(counts.values()),
                 shards_written=len(todo), shards_skipped_complete=num_shards - len(todo), num_shards=num_shards)
  with open(os.path.join(out_dir, f"{prefix}-summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string("out", None, "Output directory of the shards.")
  flags.DEFINE_integer("num_shards", 16, "Number of shards.")
  flags.DEFINE_string("prefix", "train", "Shard file name prefix.")
  flags.DEFINE_bool("no_nouns", False, "Do not store the caption nouns.")
  flags.DEFINE_string("webdataset", "", "Source: WebDataset tar files (brace pattern).")
  flags.DEFINE_string("image_dir", "", "Source: a folder of images (with --captions).")
  flags.DEFINE_string("captions", "", "The captions of --image_dir: FILE.csv|tsv|jsonl.")
  flags.DEFINE_string("file_column", "", "Column of the image file names in --captions.")
  flags.DEFINE_string("text_column", "", "Column of the captions in --captions.")
  flags.DEFINE_string("tfds", "", "Source: a TFDS dataset name.")
  flags.DEFINE_string("split", "train", "TFDS split.")
  flags.DEFINE_string("tfds_data_dir", "", "TFDS data_dir.")
  flags.DEFINE_string("image_key", "image", "TFDS image feature.")
  flags.DEFINE_string("text_key", "caption", "TFDS caption feature.")
  flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  a = flags.FLAGS
  if sum(bool(x) for x in (a.webdataset, a.image_dir, a.tfds)) != 1:
    raise app.UsageError("give exactly one source: --webdataset, --image_dir (+ --captions) or --tfds")
  if a.webdataset:
    records = read_webdataset(a.webdataset)
  elif a.image_dir:
    if not a.captions:
      raise app.UsageError("--image_dir needs --captions=FILE.csv|tsv|jsonl")
    records = read_image_folder(a.image_dir, a.captions, a.file_column, a.text_column)
  else:
    records = read_tfds(a.tfds, a.split, a.tfds_data_dir, a.image_key, a.text_key)
  s = write_shards(records, a.out, a.num_shards, a.prefix, not a.no_nouns)
  print(f"written {s['written']} records into {s['num_shards']} shards ({s['shards_written']} new, "
        f"{s['shards_skipped_complete']} already complete); skipped {s['skipped_total']}: {s['skipped']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
