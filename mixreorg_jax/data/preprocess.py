"""Per-example preprocessing in tf.data: validate, decode, crop, flip, jitter, normalise (all in-graph).

Every record is checked before it is decoded, from its bytes alone, so that a corrupt or hostile record costs
no more than reading its header:
  * the format comes from the magic bytes (JPEG, PNG, GIF, WebP, BMP); anything else is `unknown_format`;
  * the width and height come from the header (tf.image.extract_jpeg_shape reads the JPEG markers only;
    PNG/GIF/WebP/BMP keep them at fixed offsets), so a 30000x30000 header is refused (`too_large`) before a
    single pixel is allocated;
  * a JPEG without its end-of-image marker, a PNG without IEND and a GIF without its trailer are `truncated`;
  * captions that are not UTF-8 or are empty after stripping are refused.
`validate_example` returns the index of the reason in REASONS (0 = ok); the pipeline counts them.

Random ops are stateless and seeded per example (seed, example index), so deterministic runs and resumed runs
draw the same crops.
"""
from typing import Dict, Sequence, Tuple

import tensorflow as tf

from mixreorg_jax.data.pixels import pixel_statistics

REASONS = ("ok", "empty_image", "unknown_format", "bad_header", "truncated", "too_small", "too_large",
           "empty_caption", "bad_caption_utf8", "decode_error", "corrupt_file")
# "corrupt_file" counts files, not records: a TFRecord file cut short or damaged, read up to the damage.
REASON_ID = {r: i for i, r in enumerate(REASONS)}
FORMATS = ("unknown", "jpeg", "png", "gif", "webp", "bmp")
MIN_IMAGE_SIDE = 4  # images smaller than this (e.g. 1x1 pixels) carry no content worth a crop.
MAX_IMAGE_PIXELS = 8192 * 8192  # larger headers are refused before decoding (memory stays bounded).
_PAD = b"\0" * 64


def make_example(features: Dict[str, object]) -> bytes:
  """Serialises a tf.train.Example from {key: bytes | str | list of bytes/str | int | list of int}.

  With the feature map's keys in sorted order, so that the same features are the same bytes in every process
  (the default order of protobuf's map serialisation is not fixed).
  """
  feats = {}
  for key, value in features.items():
    values = value if isinstance(value, (list, tuple)) else [value]
    values = [v.encode() if isinstance(v, str) else v for v in values]
    if all(isinstance(v, int) for v in values) and values:
      feats[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    else:
      feats[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------- header checks


def _byte_at(data: tf.Tensor, i: int) -> tf.Tensor:
  """data[i] as int32; data is the zero-padded 64-byte head, so fixed offsets are always in bounds."""
  return tf.cast(data[i], tf.int32)


def _be16(data, i):
  return _byte_at(data, i) * 256 + _byte_at(data, i + 1)


def _le16(data, i):
  return _byte_at(data, i) + _byte_at(data, i + 1) * 256


def _tail_has(data: tf.Tensor, pattern: Sequence[int], window: int) -> tf.Tensor:
  """Whether `pattern` occurs within the last `window` bytes of data (tolerates trailing padding)."""
  tail = data[-window:]
  k = len(pattern)
  m = tf.shape(tail)[0] - k + 1
  hit = tf.ones(tf.maximum(m, 0), tf.bool)
  for j, b in enumerate(pattern):
    hit = tf.logical_and(hit, tf.equal(tail[j:j + tf.maximum(m, 0)], b))
  return tf.reduce_any(hit)


def _has_bytes(encoded: tf.Tensor, prefix: bytes, offset: int = 0) -> tf.Tensor:
  """encoded[offset:offset+len(prefix)] == prefix, as one string op."""
  return tf.equal(tf.strings.substr(encoded, offset, len(prefix)), prefix)


def image_header(encoded: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Format, size and integrity of encoded image bytes, without decoding. encoded: scalar tf.string.

  Returns dict(format=int32 index into FORMATS, height, width (int32, 0 if unknown), header_ok, complete (bool)).
  """
  # Fixed-offset formats need the first 30 bytes; zero padding keeps short or empty records in bounds.
  head = tf.io.decode_raw(tf.strings.substr(encoded + _PAD, 0, 64), tf.uint8)  # >= 64 bytes: plain indexing
  n = tf.strings.length(encoded)
  padded = encoded + _PAD
  is_jpeg = _has_bytes(padded, b"\xff\xd8\xff")
  is_png = _has_bytes(padded, b"\x89PNG\r\n\x1a\n")
  is_gif = tf.logical_or(_has_bytes(padded, b"GIF87a"), _has_bytes(padded, b"GIF89a"))
  is_webp = tf.logical_and(_has_bytes(padded, b"RIFF"), _has_bytes(padded, b"WEBP", 8))
  is_bmp = _has_bytes(padded, b"BM")
  fmt = tf.argmax(tf.stack([tf.constant(False), is_jpeg, is_png, is_gif, is_webp, is_bmp])) * tf.cast(
      tf.reduce_any(tf.stack([is_jpeg, is_png, is_gif, is_webp, is_bmp])), tf.int64)
  fmt = tf.cast(fmt, tf.int32)
  tail = tf.io.decode_raw(tf.strings.substr(encoded, tf.maximum(n - 64, 0), 64), tf.uint8)

  def jpeg():
    # Reads only the markers up to SOF. A header too broken to parse raises here; the pipeline's ignore_errors
    # drops the record and its index gap is counted as decode_error.
    # Truncated files (no end-of-image marker) are refused without parsing them.
    complete = _tail_has(tail, (0xFF, 0xD9), 64)
    shape = tf.cond(complete, lambda: tf.image.extract_jpeg_shape(encoded), lambda: tf.zeros([3], tf.int32))
    return shape[0], shape[1], tf.constant(True), complete

  def png():
    ok = _has_bytes(padded, b"IHDR", 12)
    h = _be16(head, 20) * 65536 + _be16(head, 22)
    w = _be16(head, 16) * 65536 + _be16(head, 18)
    return h, w, ok, _tail_has(tail, tuple(b"IEND"), 64)

  def gif():
    return _le16(head, 8), _le16(head, 6), tf.constant(True), _tail_has(tail, (0x3B,), 8)

  def webp():
    vp8x, vp8l = _has_bytes(padded, b"VP8X", 12), _has_bytes(padded, b"VP8L", 12)
    lossy = _has_bytes(padded, b"VP8 ", 12)
    # VP8X: 24-bit (width - 1, height - 1); VP8L: 14-bit fields after the 0x2f signature; VP8: 14-bit fields.
    wx = _le16(head, 24) + _byte_at(head, 26) * 65536 + 1
    hx = _le16(head, 27) + _byte_at(head, 29) * 65536 + 1
    bits = _le16(head, 21) + _le16(head, 23) * 65536
    wl, hl = bits % 16384 + 1, (bits // 16384) % 16384 + 1
    w = tf.where(vp8x, wx, tf.where(vp8l, wl, _le16(head, 26) % 16384))
    h = tf.where(vp8x, hx, tf.where(vp8l, hl, _le16(head, 28) % 16384))
    riff_len = _le16(head, 4) + _le16(head, 6) * 65536 + 8
    return h, w, tf.reduce_any(tf.stack([vp8x, vp8l, lossy])), n >= riff_len

  def bmp():
    w = _le16(head, 18) + _le16(head, 20) * 65536
    h = tf.abs(_le16(head, 22) + _le16(head, 24) * 65536)
    return h, w, tf.constant(True), n >= _le16(head, 2) + _le16(head, 4) * 65536

  def unknown():
    return tf.constant(0), tf.constant(0), tf.constant(False), tf.constant(False)

  h, w, ok, complete = tf.switch_case(fmt, [unknown, jpeg, png, gif, webp, bmp])
  return dict(format=fmt, height=h, width=w, header_ok=ok, complete=complete)


def validate_example(encoded: tf.Tensor, caption: tf.Tensor, max_pixels: int = MAX_IMAGE_PIXELS,
                     min_side: int = MIN_IMAGE_SIDE) -> Tuple[tf.Tensor, Dict[str, tf.Tensor], tf.Tensor]:
  """Checks one record. Returns (reason int32 index into REASONS, image_header(...), stripped caption)."""
  header = image_header(encoded)
  text = tf.strings.strip(caption)
  valid_utf8 = tf.equal(tf.strings.unicode_transcode(caption, "UTF-8", "UTF-8", errors="replace",
                                                     replacement_char=0xFFFD), caption)
  h = tf.cast(header["height"], tf.int64)
  w = tf.cast(header["width"], tf.int64)
  checks = [  # (failed, reason), first failure wins
      (tf.equal(tf.strings.length(encoded), 0), "empty_image"),
      (tf.equal(header["format"], 0), "unknown_format"),
      (tf.logical_not(header["header_ok"]), "bad_header"),
      (tf.logical_not(header["complete"]), "truncated"),
      (tf.logical_or(h < min_side, w < min_side), "too_small"),
      (h * w > max_pixels, "too_large"),
      (tf.logical_not(valid_utf8), "bad_caption_utf8"),
      (tf.equal(tf.strings.length(text), 0), "empty_caption"),
  ]
  reason = tf.constant(0, tf.int32)
  for failed, name in reversed(checks):
    reason = tf.where(failed, REASON_ID[name], reason)
  return reason, header, text


# ---------------------------------------------------------------------------------------------- decode + augment


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Any of JPEG (incl. CMYK/grey), PNG (grey/RGBA/16-bit), GIF (first frame), WebP, BMP -> uint8 [h, w, 3]."""
  return tf.ensure_shape(tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8),
                         [None, None, 3])


def _random_crop_window(header: Dict[str, tf.Tensor], seed: tf.Tensor, scale: Tuple[float, float]) -> tf.Tensor:
  """RandomResizedCrop's window (aspect 3/4..4/3, area fraction in `scale`) as [y, x, h, w] int32."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([header["height"], header["width"], 3]), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=tuple(scale), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def normalize(image: tf.Tensor, normalization: str = "clip") -> tf.Tensor:
  """uint8 or [0, 255] float [..., 3] -> float32 normalised with the named pixel statistics."""
  mean, std = pixel_statistics(normalization)
  x = tf.cast(image, tf.float32) / 255.0
  return (x - tf.constant(mean)) / tf.constant(std)


def color_jitter(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
  """Brightness, contrast and saturation by factors in [1-s, 1+s] and hue by s/4, on [0, 1] floats."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  image = tf.image.stateless_random_brightness(image, strength, seeds[0])
  image = tf.image.stateless_random_contrast(image, 1 - strength, 1 + strength, seeds[1])
  image = tf.image.stateless_random_saturation(image, max(0.0, 1 - strength), 1 + strength, seeds[2])
  image = tf.image.stateless_random_hue(image, min(0.5, strength / 4), seeds[3])
  return tf.clip_by_value(image, 0.0, 1.0)


def train_image(encoded: tf.Tensor, header: Dict[str, tf.Tensor], seed: tf.Tensor, image_size: int,
                crop_scale=(0.08, 1.0), jitter: float = 0.0, normalization: str = "clip") -> tf.Tensor:
  """Random resized crop + horizontal flip (+ colour jitter) -> normalised float32 [S, S, 3].

  JPEGs decode only the crop window (tf.io.decode_and_crop_jpeg), the dominant cost at 224 px.
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  window = _random_crop_window(header, seeds[0], crop_scale)
  crop = tf.cond(tf.equal(header["format"], FORMATS.index("jpeg")),
                 lambda: tf.io.decode_and_crop_jpeg(encoded, window, channels=3),
                 lambda: tf.image.crop_to_bounding_box(decode_rgb(encoded), window[0], window[1], window[2],
                                                       window[3]))
  image = tf.image.resize(crop, (image_size, image_size), method="bilinear", antialias=False)
  image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  if jitter:
    image = color_jitter(image / 255.0, jitter, seeds[2]) * 255.0
  return tf.ensure_shape(normalize(image, normalization), [image_size, image_size, 3])


# ---------------------------------------------------------------------------------------------- noun prompts


def noun_prompts(caption: tf.Tensor, nouns: tf.Tensor, templates: Sequence[str], num: int,
                 seed: tf.Tensor) -> tf.Tensor:
  """Up to `num` nouns, sampled without replacement, each in a random template; the caption fills the rest.

  GroupViT's multi-label behaviour: [caption] * (num - k) + [template(noun) for k sampled nouns].
  caption: scalar string; nouns: string [n]. Returns string [num].
  """
  for t in templates:
    if t.count("{}") != 1:
      raise ValueError(f"config.input.prompt_templates: each template needs exactly one '{{}}', got {t!r}.")
  prefixes = tf.constant([t.split("{}")[0] for t in templates])
  suffixes = tf.constant([t.split("{}")[1] for t in templates])
  nouns = tf.boolean_mask(nouns, tf.strings.length(tf.strings.strip(nouns)) > 0)
  s_perm, s_tmpl = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  order = tf.argsort(tf.random.stateless_uniform(tf.shape(nouns), s_perm))
  chosen = tf.gather(nouns, order)[:num]
  k = tf.shape(chosen)[0]
  which = tf.random.stateless_uniform([k], s_tmpl, 0, len(templates), dtype=tf.int32)
  prompts = tf.gather(prefixes, which) + chosen + tf.gather(suffixes, which)
  out = tf.concat([tf.fill([num - k], caption), prompts], axis=0)
  return tf.ensure_shape(out, [num])
