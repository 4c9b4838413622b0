"""Zero-shot semantic segmentation with a GroupViT-style model: GroupViT's evaluation protocol, batched and jitted.

Each step follows NVlabs/GroupViT `segmentation/evaluation/group_vit_seg.py` (GroupViTSegInference) and the
mmseg 0.18 test pipeline it runs in (configs/_base_/datasets/*.py):

  1. `class_embeddings`: one text embedding per class, the L2-normalised mean over prompt templates of the
     normalised prompt embeddings (GroupViT's `build_text_embedding`); background is never prompted.
  2. `resized_shape` + `window_positions`: the image is resized (keep ratio) so its short side is `short_side`
     (mmseg `Resize(img_scale=(2048, 448), keep_ratio=True)`), then cut into `window` x `window` crops at `stride`
     (mmseg `slide_inference`; an image smaller than a window is one crop of its own size).
  3. `pixel_logits` per crop (`GroupViTSegInference.encode_decode`): the soft assignments of the grouping
     stages are multiplied (patch -> final group), bilinearly upsampled to the crop's pixels, and each pixel is
     given its argmax group (a one-hot map). Group-to-class affinity is softmax(scale * cos(segment, class)); it
     is restricted to the top-k classes by image-level affinity (softmax of scale * cos(image, class)),
     re-softmaxed and multiplied by the unrestricted softmax. A pixel's class scores are its group's row. With
     a background class, a pixel whose best score is below min(bg_threshold, best score in the crop) gets
     background score 1 (else 0).
  4. `SlidingWindowSegmenter`: crop scores are summed into the resized image and divided by the number of
     crops covering each pixel, then bilinearly resized to the original image (mmseg, align_corners=False);
     the label is the argmax (mmseg's extra softmax does not change it). It also gives each image's best group
     score (the best class score of any group of its crops, groups that own no pixel included), with which a
     threshold sweep on the foreground scores applies the background rule exactly (`seg_metrics`).

short_side, window and stride of 0 mean "native": no resize, the whole image as one window, stride = window.
Resizing uses torch's bilinear rule (align_corners=False, no antialiasing) in numpy on the host and in jnp on
device, so crops and logits match the reference implementation pixel for pixel.
"""
import dataclasses
import functools
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mixreorg_jax.data import pixels
from mixreorg_jax.models import grouping
from mixreorg_jax.models import groupvit

# mmseg's Resize(img_scale=(2048, 448)): the long side is capped at 2048 / 448 times the short side target.
LONG_SIDE_RATIO = 2048 / 448


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The protocol values of an eval config (configs/eval/__init__.py documents each key)."""
  short_side: int = 448
  window: int = 448
  stride: int = 224
  top_k_classes: int = 5
  bg_threshold: float = -1.0
  with_background: bool = False
  batch_size: int = 8

  @classmethod
  def from_config(cls, config) -> "Protocol":
    return cls(short_side=int(config.short_side), window=int(config.window), stride=int(config.stride),
               top_k_classes=int(config.top_k_classes), bg_threshold=float(config.bg_threshold),
               with_background=bool(config.with_background), batch_size=int(config.batch_size))


# ----------------------------------------------------------------------------------------------------------------
# Text side.
# ----------------------------------------------------------------------------------------------------------------
def foreground_names(class_names: Sequence[str], with_background: bool) -> Tuple[str, ...]:
  """The names that are prompted: every class but the background (label 0) when there is one (GroupViT)."""
  return tuple(class_names[1:]) if with_background else tuple(class_names)


def class_embeddings(encode_text_fn: Callable, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> jax.Array:
  """Text embedding per class: templates filled with the name, encoded, averaged, L2-normalised.

  Args:
    encode_text_fn: int32 tokens [n, L] -> L2-normalised embeddings [n, D].
    tokenizer: has `tokenize_numpy(list of str) -> int32 [n, L]` (mixreorg_jax.data.tokenizers).
    class_names: C names (no background).
    templates: T prompt templates with one "{}".
    batch_size: prompts per call; the last call is padded so the text encoder compiles once.
  Returns:
    float32 [C, D], L2-normalised.
  """
  if not class_names or not templates:
    raise ValueError(f"class_embeddings: need class names and templates, got {len(class_names)} names and "
                     f"{len(templates)} templates (config.class_names / config.prompt_templates).")
  prompts = [t.format(name) for name in class_names for t in templates]  # class-major: [C * T]
  tokens = tokenizer.tokenize_numpy(prompts)
  chunk = min(batch_size, len(prompts))
  outputs = []
  for start in range(0, len(prompts), chunk):
    part = tokens[start:start + chunk]
    padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)]) if len(part) < chunk else part
    outputs.append(np.asarray(encode_text_fn(jnp.asarray(padded)))[:len(part)])
  emb = np.concatenate(outputs).reshape(len(class_names), len(templates), -1).mean(axis=1)  # [C, D]
  return groupvit.l2_normalize(jnp.asarray(emb))


# ----------------------------------------------------------------------------------------------------------------
# Bilinear resizing as torch's interpolate(mode="bilinear", align_corners=False), numpy and jnp.
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def bilinear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """-> (i0, i1, w1) int/int/float32 [out]: out[j] = (1 - w1[j]) * x[i0[j]] + w1[j] * x[i1[j]].

  Source coordinate (j + 0.5) * in / out - 0.5, clamped at 0; the upper neighbour clamped at in - 1.
  """
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x, out_hw: Tuple[int, int], axes: Tuple[int, int] = (0, 1)):
  """Resizes two axes of a numpy or jnp array to out_hw, as torch bilinear with align_corners=False."""
  xp = jnp if isinstance(x, jax.Array) else np
  for axis, size in zip(axes, out_hw):
    if x.shape[axis] == size:
      continue
    i0, i1, w1 = bilinear_taps(x.shape[axis], int(size))
    shape = [1] * x.ndim
    shape[axis] = int(size)
    w1 = w1.reshape(shape)
    x = xp.take(x, i0, axis=axis) * (1 - w1) + xp.take(x, i1, axis=axis) * w1
  return x


# ----------------------------------------------------------------------------------------------------------------
# Image side: pixel-level class scores of one batch of crops.
# ----------------------------------------------------------------------------------------------------------------
def pixel_groups(soft_assignment: jax.Array, grid: Tuple[int, int], out_hw: Tuple[int, int]) -> jax.Array:
  """Soft patch-to-group assignment [B, N, G] (N = grid[0] * grid[1], row-major) -> argmax group int32 [B, H, W].

  GroupViT `get_attn_maps`: the chained soft map is resized bilinearly to the crop, then one-hot by argmax.
  """
  b, n, g = soft_assignment.shape
  assert n == grid[0] * grid[1], (soft_assignment.shape, grid)
  maps = resize_bilinear(soft_assignment.reshape(b, grid[0], grid[1], g), out_hw, axes=(1, 2))  # [B, H, W, G]
  return jnp.argmax(maps, axis=-1).astype(jnp.int32)


def group_class_affinity(segment_emb: jax.Array, image_emb: jax.Array, class_emb: jax.Array,
                         logit_scale: jax.Array, top_k: int) -> jax.Array:
  """GroupViT's group-to-class scores: [B, G, D], [B, D], [C, D] (normalised), scalar -> [B, G, C] in [0, 1].

  softmax over classes of scale * cos(segment, class), restricted to the top_k classes by image-level affinity
  (top_k <= 0 or >= C: all), re-softmaxed and multiplied by the unrestricted softmax (`encode_decode`).
  """
  logits = logit_scale * jnp.einsum("bgd,cd->bgc", segment_emb, class_emb)  # [B, G, C]
  full = jax.nn.softmax(logits, axis=-1)
  num_classes = class_emb.shape[0]
  if 0 < top_k < num_classes:
    image_logits = logit_scale * image_emb @ class_emb.T  # [B, C]; softmax is monotone, top-k on logits.
    _, top = jax.lax.top_k(image_logits, top_k)  # [B, k]
    keep = jnp.zeros((image_logits.shape[0], num_classes), bool).at[jnp.arange(top.shape[0])[:, None], top].set(True)
    restricted = jax.nn.softmax(jnp.where(keep[:, None, :], logits, -jnp.inf), axis=-1)
  else:
    restricted = full
  return restricted * full


def pixel_logits(segment_emb: jax.Array, soft_assignment: jax.Array, grid: Tuple[int, int], image_emb: jax.Array,
                 class_emb: jax.Array, out_hw: Tuple[int, int], logit_scale: jax.Array, top_k: int = 5,
                 bg_threshold: float = -1.0, with_background: bool = False,
                 groups: Optional[jax.Array] = None, affinity: Optional[jax.Array] = None) -> jax.Array:
  """Pixel-level class scores of one scale (GroupViT `encode_decode`).

  Args:
    segment_emb: [B, G, D] L2-normalised projected segment tokens.
    soft_assignment: [B, N, G] patch-to-final-group soft assignment (stages multiplied).
    grid: the patch grid (gh, gw), N = gh * gw.
    image_emb: [B, D] L2-normalised image embedding (for the top-k class restriction).
    class_emb: [C, D] L2-normalised class text embeddings (foreground classes only).
    out_hw: (H, W) pixels of the crop.
    logit_scale: scalar, the model's clamped exp(logit_scale).
    top_k: classes kept per image (GroupViT: 5).
    bg_threshold: background where the best class score < min(bg_threshold, best score of the crop).
    with_background: prepend a background channel (label 0).
    groups: optional precomputed `pixel_groups` [B, H, W].
    affinity: optional precomputed `group_class_affinity` [B, G, C] of these arguments.
  Returns:
    float32 [B, C (+1 with background), H, W].
  """
  if groups is None:
    groups = pixel_groups(soft_assignment, grid, out_hw)  # [B, H, W]
  if affinity is None:
    affinity = group_class_affinity(segment_emb, image_emb, class_emb, logit_scale, top_k)  # [B, G, C]
  scores = jax.vmap(lambda a, g: a[g])(affinity, groups)  # one-hot map @ affinity: [B, H, W, C]
  if with_background:
    threshold = jnp.minimum(bg_threshold, affinity.max(axis=(1, 2)))  # [B]
    background = (scores.max(axis=-1) < threshold[:, None, None]).astype(scores.dtype)  # [B, H, W]
    scores = jnp.concatenate([background[..., None], scores], axis=-1)
  return jnp.transpose(scores, (0, 3, 1, 2))


def predict(logits) -> np.ndarray:
  """Class scores [..., C, H, W] -> label map int [..., H, W] (argmax over classes)."""
  return np.asarray(jnp.argmax(jnp.asarray(logits), axis=-3)).astype(np.int32)


def random_assignment(key: jax.Array, shape: Tuple[int, int, int]) -> jax.Array:
  """A chance baseline's assignment [B, N, G]: each patch one-hot on a uniformly random group."""
  b, n, g = shape
  return jax.nn.one_hot(jax.random.randint(key, (b, n), 0, g), g, dtype=jnp.float32)


@functools.lru_cache(maxsize=16)
def make_text_fn(model: groupvit.GroupViT) -> Callable:
  """jitted fn(variables, tokens int32 [n, L]) -> [n, D] L2-normalised (cached: periodic evals compile once)."""
  return jax.jit(lambda variables, tokens: model.apply(variables, tokens, method=groupvit.GroupViT.encode_text))


@functools.lru_cache(maxsize=16)
def make_window_fn(model: groupvit.GroupViT, protocol: Protocol, random_groups: bool = False) -> Callable:
  """jitted fn(variables, images [B, h, w, 3] normalised, class_emb [C, D], key) -> (logits [B, C', h, w],
  groups int32 [B, h, w], best group score float32 [B]: the highest group-to-class affinity of each crop, the
  cap of the background rule). With random_groups, each patch's group is drawn uniformly from `key` (chance).
  Cached per (model, protocol), so the trainer's periodic evaluations compile once."""

  def image_outputs(module, images):
    return module.encode_image(images), module.scale()

  @jax.jit
  def window_fn(variables, images, class_emb, key):
    enc, scale = model.apply(variables, images, method=image_outputs)
    soft = grouping.patch_to_segment([a.soft for a in enc.assignments])  # [B, N, G]
    if random_groups:
      soft = random_assignment(key, soft.shape)
    out_hw = images.shape[1:3]
    groups = pixel_groups(soft, enc.grid, out_hw)
    affinity = group_class_affinity(enc.segment_embeddings, enc.embedding, class_emb, scale, protocol.top_k_classes)
    logits = pixel_logits(enc.segment_embeddings, soft, enc.grid, enc.embedding, class_emb, out_hw, scale,
                          protocol.top_k_classes, protocol.bg_threshold, protocol.with_background, groups=groups,
                          affinity=affinity)
    return logits, groups, affinity.max(axis=(1, 2))

  return window_fn


# ----------------------------------------------------------------------------------------------------------------
# Resize + sliding windows (host side), batched across crops of consecutive images.
# ----------------------------------------------------------------------------------------------------------------
def resized_shape(height: int, width: int, short_side: int) -> Tuple[int, int]:
  """(H, W) after mmseg's keep-ratio Resize to short side `short_side` (long side capped); 0 = unchanged."""
  if short_side <= 0:
    return height, width
  scale = min(short_side / min(height, width), short_side * LONG_SIDE_RATIO / max(height, width))
  return int(height * scale + 0.5), int(width * scale + 0.5)


def window_positions(height: int, width: int, window: int, stride: int) -> List[Tuple[int, int, int, int]]:
  """Crops (y0, y1, x0, x1) of mmseg's `slide_inference`: window x window at stride, the last ones shifted back
  to end at the border; a side shorter than the window is one crop of its length. window 0 = whole image,
  stride 0 = window."""
  if window <= 0:
    return [(0, height, 0, width)]
  stride = stride if stride > 0 else window

  def starts(size):
    count = max(size - window + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
      end = min(i * stride + window, size)
      spans.append((max(end - window, 0), end))
    return spans

  return [(y0, y1, x0, x1) for y0, y1 in starts(height) for x0, x1 in starts(width)]


def normalize_image(image: np.ndarray, normalization: str = "clip") -> np.ndarray:
  """uint8 or [0, 255] float [..., 3] -> float32 normalised as the training pipeline does (preprocess.normalize).

  normalization: the pixel statistics the model expects, "clip" or "imagenet" (`InferenceModel.image_normalization`,
  config.input.normalization).
  """
  mean, std = pixels.pixel_statistics(normalization)
  x = np.asarray(image, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class Segmentation(NamedTuple):
  """One segmented image (what `SlidingWindowSegmenter` yields)."""
  key: Any
  scores: np.ndarray  # float32 [C, H, W] at the original size (a background channel first, if the protocol has one)
  groups: np.ndarray  # int32 [H, W]: the argmax group (of the last crop covering each pixel)
  best_group_score: float  # the best group-to-class affinity over the image's crops (the background rule's cap)


@dataclasses.dataclass
class _Pending:
  """One image being segmented: accumulated crop scores and the crops still to come."""
  key: Any
  original_hw: Tuple[int, int]
  scores: Optional[np.ndarray]  # [C, h, w] sum over crops (allocated with the first crop).
  counts: np.ndarray  # [h, w] crops covering each pixel.
  groups: np.ndarray  # [h, w] group of the last crop covering each pixel (for pictures).
  remaining: int
  best_group_score: float = -np.inf  # max over the crops so far.


class SlidingWindowSegmenter:
  """Segments a stream of images with the protocol; crops of consecutive images share jitted batches.

    segmenter = SlidingWindowSegmenter(model, variables, class_emb, Protocol.from_config(config))
    for key, logits, groups, _ in segmenter(((name, image) for name, image, _ in dataset)):
      label = logits.argmax(0)      # logits float32 [C, H, W], groups int32 [H, W] at the original size

  random_groups_seed: if set, the chance baseline (each patch's group uniform at random, seeded per crop batch).
  image_normalization: the pixel statistics the model expects (`normalize_image`).
  """

  _patch = 1  # the model's patch size (set by __init__): no side is resized below it.

  def __init__(self, model: groupvit.GroupViT, variables: Dict[str, Any], class_emb: jax.Array,
               protocol: Protocol, random_groups_seed: Optional[int] = None, image_normalization: str = "clip"):
    pixels.pixel_statistics(image_normalization)  # an unknown name fails here, not on the first image.
    self.image_normalization = image_normalization
    self.variables = variables
    self.class_emb = class_emb
    self.protocol = protocol
    self.random_groups_seed = random_groups_seed
    self._window_fn = make_window_fn(model, protocol, random_groups=random_groups_seed is not None)
    self._patch = model.vision_model.patch_size
    self._batches = 0

  def _run(self, crops: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops of one shape [h, w, 3] (normalised) -> (logits [n, C, h, w], groups [n, h, w], best group score
    [n]); padded batches."""
    n, size = len(crops), max(self.protocol.batch_size, 1)
    batch = np.stack(crops + [np.zeros_like(crops[0])] * (size - n)) if n < size else np.stack(crops)
    seed = self.random_groups_seed or 0
    key = jax.random.fold_in(jax.random.key(seed), self._batches)
    self._batches += 1
    logits, groups, best = jax.device_get(self._window_fn(self.variables, jnp.asarray(batch), self.class_emb, key))
    return logits[:n], groups[:n], best[:n]

  def __call__(self, examples: Iterable[Tuple[Any, np.ndarray]]) -> Iterator[Segmentation]:
    """(key, image uint8 [H, W, 3]) -> a `Segmentation` per image, in input order."""
    p = self.protocol
    pending: List[_Pending] = []
    queue: List[Tuple[_Pending, Tuple[int, int, int, int], np.ndarray]] = []  # (image, crop box, crop)

    def flush():
      if not queue:
        return
      logits, groups, best = self._run([crop for _, _, crop in queue])
      for (item, (y0, y1, x0, x1), _), lg, gr, bs in zip(queue, logits, groups, best):
        if item.scores is None:
          item.scores = np.zeros((lg.shape[0],) + item.counts.shape, np.float32)
        item.scores[:, y0:y1, x0:x1] += lg
        item.counts[y0:y1, x0:x1] += 1
        item.groups[y0:y1, x0:x1] = gr
        item.best_group_score = max(item.best_group_score, float(bs))
        item.remaining -= 1
      queue.clear()

    def finished():
      while pending and pending[0].remaining == 0:
        item = pending.pop(0)
        assert item.counts.min() > 0, "the crops must cover the image"
        scores = resize_bilinear(item.scores / item.counts, item.original_hw, axes=(1, 2))
        ys = bilinear_taps(item.counts.shape[0], item.original_hw[0])[0]  # nearest-ish pick for the picture
        xs = bilinear_taps(item.counts.shape[1], item.original_hw[1])[0]
        yield Segmentation(item.key, scores.astype(np.float32), item.groups[ys][:, xs], item.best_group_score)

    for key, image in examples:
      image = np.asarray(image)
      h0, w0 = image.shape[:2]
      # A side thinner than one patch after the resize (a 1-pixel-wide photo) is stretched to one patch: the
      # model sees nothing smaller.
      h, w = (max(x, self._patch) for x in resized_shape(h0, w0, p.short_side))
      resized = normalize_image(resize_bilinear(image.astype(np.float32), (h, w)), self.image_normalization)
      boxes = window_positions(h, w, p.window, p.stride)
      item = _Pending(key, (h0, w0), None, np.zeros((h, w), np.int32), np.zeros((h, w), np.int32), len(boxes))
      pending.append(item)
      for box in boxes:
        crop = resized[box[0]:box[1], box[2]:box[3]]
        if queue and queue[0][2].shape != crop.shape:
          flush()
        queue.append((item, box, crop))
        if len(queue) >= max(p.batch_size, 1):
          flush()
      yield from finished()
    flush()
    yield from finished()
