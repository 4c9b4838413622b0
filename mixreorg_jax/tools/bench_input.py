"""Input throughput: the tf.data pipeline vs a plain PIL + numpy loader, on the same JPEG shards, in one run.

  python -m mixreorg_jax.tools.bench_input [--num_images=512 --source_size=320 --image_size=224 --batch_size=64]

Writes JPEGs of source_size x 4/3 source_size into a temporary shard, then times images/s of
  * tf.data: make_train_dataset (validate, decode-and-crop, resize, flip, normalise, tokenize, batch);
  * PIL: the straightforward Python loop doing the same decode, random resized crop, flip and CLIP normalise;
and prints a table with the ratio. The demo row (64 px, the demo's batch) is the rate to compare with the
trainer's steps/s x batch size to tell whether the demo is input-bound.
"""
import io
import os
import tempfile
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np
from PIL import Image

from mixreorg_jax.data import input_pipeline, pixels, preprocess, synthetic


def _write_shard(path: str, num: int, size: int) -> list:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  jpegs = []
  with tf.io.TFRecordWriter(path) as w:
    for i in range(num):
      image, _, names, background = synthetic.render_example(rng, size)
      image = np.array(Image.fromarray(image).resize((size * 4 // 3, size)))
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, "JPEG", quality=90)
      jpegs.append(buf.getvalue())
      w.write(preprocess.make_example({"jpg": jpegs[-1], "txt": synthetic.make_caption(rng, names, background)}))
  return jpegs


def pil_loader(jpegs: list, image_size: int, scale=(0.08, 1.0), seed: int = 0):
  """Yields CLIP-normalised float32 [S, S, 3] images the plain way (PIL decode, numpy maths)."""
  rng = np.random.default_rng(seed)
  mean, std = np.array(pixels.CLIP_MEAN, np.float32), np.array(pixels.CLIP_STD, np.float32)
  for data in jpegs:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    for _ in range(10):  # RandomResizedCrop's rejection sampling
      area = rng.uniform(*scale) * w * h
      ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
      if 0 < cw <= w and 0 < ch <= h:
        break
    else:
      cw, ch = w, h
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    im = im.crop((x, y, x + cw, y + ch)).resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(im, np.float32) / 255.0
    if rng.random() < 0.5:
      arr = arr[:, ::-1]
    yield (arr - mean) / std


def _config(data_dir: str, image_size: int, batch_size: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size, image_size=image_size, data_dir=data_dir, synthetic_dir="", datasets=(),
      image_key="jpg", text_key="txt", nouns_key="nouns", tokenizer="sentencepiece", tokenizer_path="",
      context_length=16, num_nouns=0, prompt_templates=("a photo of a {}.",), shuffle_buffer=256,
      crop_scale=(0.08, 1.0), color_jitter=0.0, seed=0, deterministic=False, num_parallel_calls=-1))


def time_pipeline(cfg, num_batches: int) -> float:
  it = input_pipeline.make_train_iterator(cfg, 0, 1)
  for _ in range(3):  # warm-up: graph tracing, shuffle buffer fill, autotune
    next(it)
  t = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches * cfg.batch_size / (time.perf_counter() - t)


def time_pil(jpegs: list, image_size: int, num_images: int) -> float:
  loader = pil_loader(jpegs * (num_images // len(jpegs) + 1), image_size)
  t = time.perf_counter()
  for _ in range(num_images):
    next(loader)
  return num_images / (time.perf_counter() - t)


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_integer("num_images", 512, "Distinct JPEGs in the shard.")
  flags.DEFINE_integer("source_size", 320, "Height of the source JPEGs.")
  flags.DEFINE_integer("image_size", 224, "Training image size.")
  flags.DEFINE_integer("batch_size", 64, "Batch size.")
  flags.DEFINE_integer("num_batches", 20, "Batches timed.")
  flags.DEFINE_integer("demo_image_size", 64, "The demo's image size.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  a = flags.FLAGS
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    jpegs = _write_shard(os.path.join(tmp, "bench.tfrecord"), a.num_images, a.source_size)
    n = a.num_batches * a.batch_size
    tf_rate = time_pipeline(_config(tmp, a.image_size, a.batch_size), a.num_batches)
    pil_rate = time_pil(jpegs, a.image_size, min(n, 4 * a.num_images))
    demo_rate = time_pipeline(_config(tmp, a.demo_image_size, a.batch_size), a.num_batches)
    rows += [(f"tf.data pipeline, {a.image_size} px", tf_rate), (f"PIL + numpy loop, {a.image_size} px", pil_rate),
             (f"tf.data pipeline, {a.demo_image_size} px (demo)", demo_rate)]
  print(f"\nsource JPEGs {a.source_size * 4 // 3}x{a.source_size}, batch {a.batch_size}, {os.cpu_count()} CPU cores")
  print(f"| {'loader':<36} | {'images/s':>9} |")
  print(f"|{'-' * 38}|{'-' * 11}|")
  for name, rate in rows:
    print(f"| {name:<36} | {rate:9.1f} |")
  print(f"\nratio tf.data / PIL at {a.image_size} px: {tf_rate / pil_rate:.2f}x (target >= 1.5x)")
  print(f"demo: input-bound if the trainer's steps/s x {a.batch_size} approaches {demo_rate:.0f} images/s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
