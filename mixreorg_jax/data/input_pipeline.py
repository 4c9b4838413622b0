"""The training input pipeline: tf.data over image-caption TFRecord shards and TFDS datasets -> host batches.

  it = make_train_iterator(config.input)            # host-local numpy batches, b = batch_size / process_count
  batch = next(it)    # image f32 [b,S,S,3] (CLIP-normalised), text i32 [b,L], nouns i32 [b,M,L] if num_nouns > 0
  it.skipped()        # {reason: count} of records dropped on this host so far (preprocess.REASONS); its
                      # "corrupt_file" counts damaged TFRecord files, read up to the damage (logged with the path)
  it.save_state(p) / it.restore_state(p)            # exact mid-epoch resume (tf.data iterator checkpoint)
  make_global_batch(batch, sharding)                # -> global jax.Arrays, batch axis over the mesh

Graph, per source (config.input.data_dir, or the weighted list config.input.datasets):
  files (this host's share) -> shuffle + repeat -> interleave(file_records) -> shuffle(input.shuffle_buffer)
then: sample_from_datasets(weights) -> enumerate -> map(parse, validate, decode, crop, noun prompts)
  -> ignore_errors -> scan(skip counters) -> filter(ok) -> batch -> map(tokenize) -> prefetch.

Skipped records are counted exactly and cheaply: the record index from `enumerate` travels with every
element through an order-preserving map, the validation reason is a field of the element, and a `scan` keeps
the running count per reason (an index gap = a record whose decoding raised and was dropped by ignore_errors).
The counters are part of the iterator state, so they survive save/restore. Every random op is stateless and
seeded by (input.seed, process, record index): with input.deterministic=True the stream is a pure function of
the config, and a restored iterator continues with exactly the batch an uninterrupted one would have produced.
"""
import collections
import os
from typing import Any, Dict, Iterator, List, Optional

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from mixreorg_jax.data import preprocess, synthetic, tokenizers

tf.config.set_visible_devices([], "GPU")
SOURCE_TFRECORD, SOURCE_TFDS = 0, 1


# ---------------------------------------------------------------------------------------------- sources


def list_files(pattern: str, config_key: str) -> List[str]:
  """Sorted TFRecord files of a directory (all *.tfrecord* inside) or a glob; an error names config_key."""
  if tf.io.gfile.isdir(pattern):
    pattern = os.path.join(pattern, "*.tfrecord*")
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"{config_key}={pattern!r} matches no TFRecord files; point it at a directory of "
                            "shards or a glob (make them with `python -m mixreorg_jax.tools.make_shards`).")
  return files


def host_files(files: List[str], process_index: int, process_count: int, config_key: str) -> List[str]:
  """This host's disjoint share of the files: files[process_index::process_count]."""
  if len(files) < process_count:
    raise ValueError(f"{config_key}: {len(files)} files cannot be split over {process_count} hosts; write at least "
                     "one shard per host (make_shards --num_shards).")
  return files[process_index::process_count]


def check_feature_keys(path: str, keys: Dict[str, str]) -> None:
  """Reads the first record of `path` and checks that the configured feature keys exist in it."""
  for record in tf.data.TFRecordDataset(path).take(1):
    present = set(tf.train.Example.FromString(record.numpy()).features.feature)
    for config_key, key in keys.items():
      if key and key not in present and not config_key.endswith("nouns_key"):
        raise KeyError(f"{config_key}={key!r} is not a feature of {path}; its features are {sorted(present)}.")


def count_records(files: List[str]) -> int:
  return int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))


def _empty_fields():
  return dict(image=tf.constant(b""), text=tf.constant(b""), nouns=tf.zeros([0], tf.string), bad_file=tf.constant(""))


# A TFRecord record on disk: 8-byte length, 4-byte CRC of the length, the data, 4-byte CRC of the data.
RECORD_OVERHEAD_BYTES = 16


def file_records(path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
  """The serialized records of one TFRecord file of `size` bytes; a damaged file ends at the damage.

  TFRecordDataset raises DataLossError at a truncated or corrupt record and then stops, and ignore_errors turns
  that error into the file's end. The bytes read are summed: a file whose records fall short of its size was cut
  there, and one extra element with bad_file = its path (and no record) reports it to the skip counters.
  """
  records = tf.data.TFRecordDataset(path).ignore_errors().map(lambda r: (r, False))
  records = records.concatenate(tf.data.Dataset.from_tensors((tf.constant(b""), True)))  # the end marker

  def account(total, element):
    record, is_end = element
    total += tf.cast(tf.strings.length(record), tf.int64) + tf.cast(~is_end, tf.int64) * RECORD_OVERHEAD_BYTES
    damaged = is_end & tf.not_equal(total, size)
    return total, (record, is_end, tf.where(damaged, path, ""))

  records = records.scan(tf.constant(0, tf.int64), account)
  records = records.filter(lambda record, is_end, bad_file: ~is_end | (tf.strings.length(bad_file) > 0))
  return records.map(lambda record, is_end, bad_file: dict(serialized=record, **dict(_empty_fields(),
                                                                                     bad_file=bad_file)))


def _tfrecord_source(files: List[str], seed: int, cfg) -> tf.data.Dataset:
  """Raw serialized examples of some files, shuffled at the file and record level, repeated forever."""
  sizes = [tf.io.gfile.stat(f).length for f in files]  # one metadata call per file, once per run
  ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(sizes, tf.int64)))
  ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
  return ds.interleave(file_records, cycle_length=min(len(files), 16), block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic)


def _tfds_source(spec: Dict[str, Any], seed: int, process_index: int, process_count: int) -> tf.data.Dataset:
  """A TFDS image-text dataset, split across hosts, with the image left encoded (decoded by preprocess)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(spec["tfds_name"], data_dir=spec.get("tfds_data_dir") or None)
  split = tfds.split_for_jax_process(spec.get("split", "train"), process_index=process_index,
                                     process_count=process_count)
  image_key, text_key = spec["image_key"], spec["text_key"]
  features = builder.info.features
  for config_key, key in (("image_key", image_key), ("text_key", text_key)):
    if key not in features:
      raise KeyError(f"config.input.datasets[{spec['name']!r}].{config_key}={key!r} is not a feature of TFDS "
                     f"{spec['tfds_name']!r}; its features are {sorted(features.keys())}.")
  decoders = {image_key: tfds.decode.SkipDecoding()} if isinstance(features[image_key], tfds.features.Image) else {}
  ds = builder.as_dataset(split=split, shuffle_files=True, decoders=decoders,
                          read_config=tfds.ReadConfig(shuffle_seed=seed))
  nouns_key = spec.get("nouns_key", "")

  def to_fields(ex):
    text = ex[text_key]
    text = tf.reshape(text, [-1])[0] if text.shape.rank else text
    nouns = tf.reshape(ex[nouns_key], [-1]) if nouns_key and nouns_key in ex else tf.zeros([0], tf.string)
    return dict(_empty_fields(), serialized=tf.constant(b""), image=ex[image_key], text=text, nouns=nouns)

  return ds.map(to_fields).repeat()


def resolve_sources(cfg) -> List[Dict[str, Any]]:
  """config.input -> list of source specs {name, kind, pattern | tfds_name + split, weight, image/text/nouns_key}."""
  defaults = dict(image_key=cfg.image_key, text_key=cfg.text_key, nouns_key=cfg.get("nouns_key", "nouns"),
                  weight=1.0)
  if cfg.get("datasets"):
    specs = []
    for i, d in enumerate(cfg.datasets):
      d = dict(d)
      spec = {**defaults, "name": d.get("name", f"dataset{i}"), **d}
      if ("pattern" in spec) == ("tfds_name" in spec):
        raise ValueError(f"config.input.datasets[{i}]: give exactly one of 'pattern' (TFRecord glob) or "
                         f"'tfds_name' (+ 'split'), got {sorted(d)}.")
      spec["key_prefix"] = f"config.input.datasets[{i}]"
      specs.append(spec)
    return specs
  pattern = cfg.data_dir
  if not pattern:
    pattern = synthetic.ensure_synthetic_data(cfg.synthetic_dir, scene_share=cfg.synthetic_scene_share)
  return [dict(defaults, name="data_dir", pattern=pattern, key_prefix="config.input")]


# ---------------------------------------------------------------------------------------------- per record


def _parse(serialized: tf.Tensor, image_key: str, text_key: str, nouns_key: str):
  """Lenient parse: missing keys become empty values (the validation step counts them)."""
  spec = {image_key: tf.io.VarLenFeature(tf.string), text_key: tf.io.VarLenFeature(tf.string)}
  if nouns_key:
    spec[nouns_key] = tf.io.VarLenFeature(tf.string)
  ex = tf.io.parse_single_example(serialized, spec)
  first = lambda k: tf.concat([ex[k].values, [b""]], axis=0)[0]
  nouns = ex[nouns_key].values if nouns_key else tf.zeros([0], tf.string)
  return first(image_key), first(text_key), nouns


def _process_fn(cfg, sources: List[Dict[str, Any]], seed: int):
  """(index, (source id, fields)) -> dict(image, text, [prompts], reason, index); never decodes a bad record."""
  size, num_nouns = cfg.image_size, cfg.num_nouns
  max_pixels = cfg.get("max_image_pixels", preprocess.MAX_IMAGE_PIXELS)
  tfrecord_keys = [(s["image_key"], s["text_key"], s["nouns_key"]) for s in sources]

  def fn(index, element):
    source, fields = element
    parsed = [lambda k=k: _parse(fields["serialized"], *k) for k in tfrecord_keys]
    image, text, nouns = tf.cond(tf.strings.length(fields["serialized"]) > 0,
                                 lambda: tf.switch_case(source, parsed) if len(parsed) > 1 else parsed[0](),
                                 lambda: (fields["image"], fields["text"], fields["nouns"]))
    reason, header, text = preprocess.validate_example(image, text, max_pixels=max_pixels)
    bad_file = fields["bad_file"]
    reason = tf.where(tf.strings.length(bad_file) > 0, preprocess.REASON_ID["corrupt_file"], reason)
    ex_seed = tf.stack([tf.constant(seed, tf.int64), index])
    seeds = tf.random.experimental.stateless_split(ex_seed, 2)
    ok = tf.equal(reason, 0)
    out = dict(index=index, reason=reason, text=text, bad_file=bad_file)
    out["image"] = tf.cond(
        ok, lambda: preprocess.train_image(image, header, seeds[0], size, tuple(cfg.crop_scale), cfg.color_jitter,
                                           cfg.get("normalization", "clip")),
        lambda: tf.zeros([size, size, 3], tf.float32))
    if num_nouns:
      out["prompts"] = preprocess.noun_prompts(text, nouns, tuple(cfg.prompt_templates), num_nouns, seeds[1])
    return out

  return fn


def _count_skipped(state, element):
  """scan step: running per-reason counts; a gap in the record index is a record dropped by ignore_errors.

  The state also keeps the distinct paths of the damaged files seen ("\n"-joined), which the batches carry to
  TrainIterator's log.
  """
  counts, expected, bad_files = state
  gap = element["index"] - expected
  counts = counts + tf.one_hot(preprocess.REASON_ID["decode_error"], len(preprocess.REASONS), dtype=tf.int64) * gap
  counts = counts + tf.one_hot(element["reason"], len(preprocess.REASONS), dtype=tf.int64) * tf.cast(
      element["reason"] > 0, tf.int64)
  path = element["bad_file"]
  new = (tf.strings.length(path) > 0) & ~tf.reduce_any(tf.equal(tf.strings.split(bad_files, "\n"), path))
  bad_files = tf.where(new, tf.strings.join([bad_files, path], "\n"), bad_files)
  element = dict(element, skipped=counts, bad_files=bad_files)
  return (counts, element["index"] + 1, bad_files), element


# ---------------------------------------------------------------------------------------------- the pipeline


def make_train_dataset(cfg, tokenizer=None, process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> tf.data.Dataset:
  """The batched host-local training tf.data.Dataset for config.input (see the module docstring)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if cfg.batch_size % process_count:
    raise ValueError(f"config.input.batch_size={cfg.batch_size} must be divisible by the {process_count} hosts.")
  local_batch = cfg.batch_size // process_count
  tokenizer = tokenizer or tokenizers.make_tokenizer(cfg)
  sources = resolve_sources(cfg)
  datasets = []
  for i, spec in enumerate(sources):
    seed = cfg.seed * 7919 + i * 104729 + process_index
    if "tfds_name" in spec:
      ds = _tfds_source(spec, seed, process_index, process_count)
    else:
      key = f"{spec['key_prefix']}." + ("pattern" if spec["key_prefix"] != "config.input" else "data_dir")
      files = list_files(spec["pattern"], key)
      check_feature_keys(files[0], {f"{spec['key_prefix']}.image_key": spec["image_key"],
                                    f"{spec['key_prefix']}.text_key": spec["text_key"],
                                    f"{spec['key_prefix']}.nouns_key": spec["nouns_key"]})
      expected = cfg.get("expected_num_examples", 0)
      if expected and len(sources) == 1 and (n := count_records(files)) != expected:
        raise ValueError(f"{key}: found {n} records but config.input.expected_num_examples={expected}.")
      ds = _tfrecord_source(host_files(files, process_index, process_count, key), seed, cfg)
    if cfg.shuffle_buffer > 1:
      ds = ds.shuffle(cfg.shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
    datasets.append(ds.map(lambda x, i=i: (tf.constant(i), x)))
  if len(datasets) == 1:
    ds = datasets[0]
  else:
    weights = np.array([float(s["weight"]) for s in sources])
    if (weights <= 0).any():
      raise ValueError(f"config.input.datasets: weights must be > 0, got {weights.tolist()}.")
    ds = tf.data.Dataset.sample_from_datasets(datasets, weights=(weights / weights.sum()).tolist(), seed=cfg.seed)

  parallel = tf.data.AUTOTUNE if cfg.num_parallel_calls in (-1, None) else cfg.num_parallel_calls
  ds = ds.enumerate()
  # Order-preserving (deterministic=True) so the scan below can turn index gaps into decode-error counts.
  ds = ds.map(_process_fn(cfg, sources, seed=cfg.seed * 1_000_003 + process_index), num_parallel_calls=parallel,
              deterministic=True)
  ds = ds.ignore_errors()
  init = (tf.zeros([len(preprocess.REASONS)], tf.int64), tf.constant(0, tf.int64), tf.constant(""))
  ds = ds.scan(init, _count_skipped)
  ds = ds.filter(lambda e: tf.equal(e["reason"], 0))
  ds = ds.batch(local_batch, drop_remainder=True)

  def finish(b):
    out = dict(image=b["image"], text=tokenizer.tokenize(b["text"]), skipped=b["skipped"][-1],
               bad_files=b["bad_files"][-1])
    if cfg.num_nouns:
      flat = tokenizer.tokenize(tf.reshape(b["prompts"], [-1]))  # [b*M, L]
      noun_length = cfg.get("noun_context_length", 0) or tokenizer.context_length  # noun prompts are short
      if noun_length < tokenizer.context_length:
        flat = tokenizers.truncate_tokens(flat, noun_length, tokenizer.eot_id)
      out["nouns"] = tf.reshape(flat, [-1, cfg.num_nouns, noun_length])
    return out

  ds = ds.map(finish, num_parallel_calls=parallel, deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = bool(cfg.deterministic)
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options)


class TrainIterator:
  """Host-local numpy batches with skip counters and exact save/restore of the input position."""

  def __init__(self, dataset: tf.data.Dataset, tokenizer):
    self.dataset, self.tokenizer = dataset, tokenizer
    self._it = iter(dataset)
    self._counts = np.zeros(len(preprocess.REASONS), np.int64)
    self._bad_files = set()
    self._counts_var = tf.Variable(self._counts)
    self._ckpt = tf.train.Checkpoint(iterator=self._it, skipped=self._counts_var)

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._it)
    self._counts = batch.pop("skipped").numpy()
    for path in batch.pop("bad_files").numpy().decode().split("\n")[1:]:
      if path not in self._bad_files:  # each damaged file is logged once; the counter counts every pass over it.
        self._bad_files.add(path)
        logging.warning("Skipped the rest of %s: the TFRecord file is truncated or corrupt from a record on; the "
                        "records before it are used (counted in data/skipped_files).", path)
    return {k: v.numpy() for k, v in batch.items()}

  def skipped(self) -> Dict[str, int]:
    """Records dropped on this host so far, by reason (sum over hosts for the global count).

    "corrupt_file" counts files instead: damaged TFRecord files whose records after the damage were not read.
    """
    return {r: int(c) for r, c in zip(preprocess.REASONS[1:], self._counts[1:])}

  def save_state(self, path: str) -> str:
    """Writes the iterator position (one file set per host: put jax.process_index() in `path`)."""
    self._counts_var.assign(self._counts)
    return self._ckpt.write(path)

  def restore_state(self, path: str) -> None:
    self._ckpt.read(path).assert_consumed()
    self._counts = self._counts_var.numpy()


def make_train_iterator(cfg, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> TrainIterator:
  """TrainIterator over make_train_dataset(config.input); batch_size is global, batches are host-local."""
  tokenizer = tokenizers.make_tokenizer(cfg)
  return TrainIterator(make_train_dataset(cfg, tokenizer, process_index, process_count), tokenizer)


# ---------------------------------------------------------------------------------------------- to devices


def make_global_batch(batch: Dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> Dict[str, jax.Array]:
  """Host-local batch -> global jax.Arrays whose leading axis is split as `sharding` says (over all hosts)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch_to_device(iterator: Iterator[Dict[str, np.ndarray]], sharding: jax.sharding.NamedSharding,
                       size: int = 2) -> Iterator[Dict[str, jax.Array]]:
  """Keeps `size` global batches in flight (transfers are asynchronous), so the step never waits on a copy."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(make_global_batch(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
