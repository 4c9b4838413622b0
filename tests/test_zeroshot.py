"""The zero-shot protocol: converted weights reproduce a GroupViT-protocol reference built from transformers' outputs;
top-k, background threshold, resizing and sliding windows behave as GroupViT / mmseg do."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixreorg_jax import zeroshot

TOL = 1e-4


class HashTokenizer:
  """Deterministic prompt ids for a small random text tower: [bos, ids..., eot, pad...] (no vocab file needed)."""

  def __init__(self, vocab_size, eot_id, context_length, bos_id=1):
    self.vocab_size, self.eot_id, self.context_length, self.bos_id = vocab_size, eot_id, context_length, bos_id

  def tokenize_numpy(self, texts):
    out = np.zeros((len(texts), self.context_length), np.int32)
    for row, text in enumerate(texts):
      rng = np.random.default_rng(zlib.crc32(text.encode()))
      ids = rng.integers(2, min(self.eot_id, self.vocab_size - 1), rng.integers(1, self.context_length - 1))
      out[row, :len(ids) + 2] = [self.bos_id, *ids, self.eot_id]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint in, numbers out: converted transformers weights against a reference of GroupViT's encode_decode.
# ----------------------------------------------------------------------------------------------------------------
def groupvit_reference(hf, images, class_tokens, top_k, bg_threshold):
  """GroupViT's encode_decode, written here in torch from transformers' outputs -> [B, 1 + C, H, W] numpy."""
  torch = pytest.importorskip("torch")
  from transformers.models.groupvit import modeling_groupvit  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(class_tokens.astype(np.int64)),
             pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), output_attentions=True)
    h, w = images.shape[1:3]
    soft = modeling_groupvit.get_grouping_from_attentions(out.vision_model_output.attentions, (h, w))  # [B,G,H,W]
    onehot = torch.nn.functional.one_hot(soft.argmax(1), soft.shape[1]).float()  # [B, H, W, G]
    tokens = out.vision_model_output.last_hidden_state  # [B, G, C]
    segments = hf.visual_projection(tokens.reshape(-1, tokens.shape[-1])).reshape(tokens.shape[0], tokens.shape[1], -1)
    segments = torch.nn.functional.normalize(segments, dim=-1)
    scale = hf.logit_scale.exp().clamp(max=100)
    outputs = []
    for b in range(images.shape[0]):
      group = segments[b] @ out.text_embeds.T * scale  # [G, C]
      pre = group.softmax(-1)
      image = (out.image_embeds[b] @ out.text_embeds.T * scale).softmax(-1)
      mask = torch.zeros_like(image, dtype=torch.bool)
      mask[image.topk(min(top_k, image.shape[0])).indices] = True
      group = group.masked_fill(~mask, float("-inf")).softmax(-1) * pre
      fg = onehot[b] @ group  # [H, W, C]
      bg = (fg.max(-1).values < min(bg_threshold, group.max().item())).float()
      outputs.append(torch.cat([bg[..., None], fg], -1).permute(2, 0, 1))
    return torch.stack(outputs).numpy(), out.text_embeds.numpy()


def test_converted_checkpoint_pixel_logits_match_groupvit_reference(tmp_path):
  pytest.importorskip("transformers")
  from tests import test_convert_parity as parity  # pylint: disable=g-import-not-at-top
  from mixreorg_jax import inference  # pylint: disable=g-import-not-at-top
  name = "three_stages_32px"
  torch = pytest.importorskip("torch")
  hf = parity.make_hf_model(name, seed=2)
  with torch.no_grad():  # distinct group tokens, so that pixels fall into several groups and classes.
    for key, p in hf.named_parameters():
      if "group_token" in key:
        p.add_(2.0 * torch.randn_like(p))
  hf.save_pretrained(tmp_path / "hf")
  parity.run_converter(tmp_path / "hf", tmp_path / "ours")
  model = inference.load(str(tmp_path / "ours"))
  spec = parity.CONFIGS[name]["text"]
  tokenizer = HashTokenizer(spec["vocab_size"], spec["eos_token_id"], spec["max_position_embeddings"])
  names = ("cat", "dog", "grass", "sky", "tree", "car", "road")
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)  # a 4 x 4 patch grid upsampled to 32 x 32 pixels.
  protocol = zeroshot.Protocol(top_k_classes=3, bg_threshold=0.3, with_background=True)
  expected, text_embeds = groupvit_reference(hf, images, tokenizer.tokenize_numpy(
      [f"a photo of a {n}." for n in names]), protocol.top_k_classes, protocol.bg_threshold)

  class_emb = zeroshot.class_embeddings(model.encode_text, tokenizer, names, ["a photo of a {}."])
  np.testing.assert_allclose(class_emb, text_embeds, atol=TOL)
  logits, groups, _ = zeroshot.make_window_fn(model.model, protocol)(model.variables, jnp.asarray(images), class_emb,
                                                                     jax.random.key(0))
  assert logits.shape == (2, 1 + len(names), 32, 32) and groups.shape == (2, 32, 32)
  assert float(np.abs(np.asarray(logits) - expected).max()) <= TOL
  # The restriction leaves at most top_k foreground classes per image; the labels mix background and classes.
  assert all(len(np.unique(np.asarray(logits)[b, 1:].argmax(0))) <= 3 for b in range(2))
  labels = zeroshot.predict(logits)
  assert 0 in labels and len(np.unique(labels)) >= 3 and len(np.unique(np.asarray(groups))) >= 2


def test_converted_checkpoint_evaluates_on_synthetic_voc_layout(tmp_path):
  pytest.importorskip("transformers")
  from tests import test_convert_parity as parity  # pylint: disable=g-import-not-at-top
  from configs.eval import voc_layout  # pylint: disable=g-import-not-at-top
  from mixreorg_jax import evaluator, inference  # pylint: disable=g-import-not-at-top
  from mixreorg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  name = "three_stages_32px"
  parity.make_hf_model(name).save_pretrained(tmp_path / "hf")
  parity.run_converter(tmp_path / "hf", tmp_path / "ours")
  model = inference.load(str(tmp_path / "ours"))
  assert model.image_normalization == "imagenet"  # what GroupViT's weights were trained and evaluated with.
  synthetic.write_voc_split(str(tmp_path / "voc"), 3, 64, 0, "voc")
  config = voc_layout.get_config()
  config.data.root = str(tmp_path / "voc")
  config.short_side = config.window = config.stride = 0  # native 64 px, one window per image.
  spec = parity.CONFIGS[name]["text"]
  tokenizer = HashTokenizer(spec["vocab_size"], spec["eos_token_id"], spec["max_position_embeddings"])
  summary = evaluator.run_protocol(model.model, model.variables, tokenizer, config, progress=False)
  assert summary["num_images"] == 3
  assert 0.0 <= summary["pixel_acc"] <= 100.0 and np.isfinite(summary["mIoU"])
  assert len(summary["per_class_iou"]) == len(synthetic.CLASS_NAMES)


# ----------------------------------------------------------------------------------------------------------------
# Protocol pieces.
# ----------------------------------------------------------------------------------------------------------------
def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_top_k_keeps_the_classes_of_highest_image_affinity():
  rng = np.random.default_rng(0)
  classes = _unit(rng.normal(size=(6, 8))).astype(np.float32)
  segments = _unit(rng.normal(size=(2, 4, 8))).astype(np.float32)
  image = _unit(classes[[4, 1]] + 0.1 * rng.normal(size=(2, 8))).astype(np.float32)  # image b resembles class 4/1
  scale = jnp.float32(10.0)
  affinity = np.asarray(zeroshot.group_class_affinity(segments, image, classes, scale, top_k=2))
  image_logits = image @ classes.T
  for b in range(2):
    top = set(np.argsort(-image_logits[b])[:2])
    assert {4, 1}.intersection(top)
    nonzero = set(np.flatnonzero(affinity[b].sum(0) > 0))
    assert nonzero == top
  full = jax.nn.softmax(scale * np.einsum("bgd,cd->bgc", segments, classes), -1)
  np.testing.assert_allclose(zeroshot.group_class_affinity(segments, image, classes, scale, top_k=0),
                             np.asarray(full) ** 2, rtol=1e-5)  # no restriction: softmax * softmax.


def test_background_threshold_and_its_cap_at_the_best_score():
  # Two groups on a 1x2 grid: the left pixel's group is confident on class 0, the right one is uncertain.
  classes = np.eye(3, dtype=np.float32)
  segments = np.array([[[1.0, 0.0, 0.0], _unit(np.array([1.0, 1.0, 1.0]))]], np.float32)  # [1, G=2, D=3]
  soft = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)  # [1, N=2, G]
  image = classes[:1]
  kwargs = dict(grid=(1, 2), image_emb=image, class_emb=classes, out_hw=(1, 2), logit_scale=jnp.float32(10.0),
                top_k=0, with_background=True)
  logits = np.asarray(zeroshot.pixel_logits(segments, soft, bg_threshold=0.5, **kwargs))
  assert logits.shape == (1, 4, 1, 2)
  np.testing.assert_array_equal(zeroshot.predict(logits), [[[1, 0]]])  # class 0 -> label 1; uncertain -> bg.
  # A threshold above every score is capped at the best one, so the best group stays foreground.
  np.testing.assert_array_equal(zeroshot.predict(zeroshot.pixel_logits(segments, soft, bg_threshold=2.0,
                                                                       **kwargs)), [[[1, 0]]])
  no_bg = zeroshot.pixel_logits(segments, soft, bg_threshold=0.5, **dict(kwargs, with_background=False))
  assert no_bg.shape == (1, 3, 1, 2)


@pytest.mark.parametrize("in_hw,out_hw", [((4, 5), (17, 23)), ((30, 41), (12, 9)), ((7, 7), (7, 7))])
def test_resize_bilinear_matches_torch(in_hw, out_hw):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, 3) + in_hw).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=out_hw, mode="bilinear",
                                             align_corners=False).numpy()
  np.testing.assert_allclose(zeroshot.resize_bilinear(x, out_hw, axes=(2, 3)), expected, atol=1e-5)
  np.testing.assert_allclose(zeroshot.resize_bilinear(jnp.asarray(x), out_hw, axes=(2, 3)), expected, atol=1e-5)


def test_resized_shape_follows_mmseg_keep_ratio():
  assert zeroshot.resized_shape(375, 500, 448) == (448, 597)
  assert zeroshot.resized_shape(500, 375, 448) == (597, 448)
  assert zeroshot.resized_shape(100, 1000, 448) == (205, 2048)  # the long side is capped at 2048.
  assert zeroshot.resized_shape(64, 64, 0) == (64, 64)


@pytest.mark.parametrize("hw", [(448, 597), (597, 448), (448, 448), (900, 1200), (64, 80), (300, 500)])
def test_windows_cover_the_image_like_mmseg(hw):
  boxes = zeroshot.window_positions(*hw, window=448, stride=224)
  covered = np.zeros(hw, int)
  for y0, y1, x0, x1 in boxes:
    assert 0 <= y0 < y1 <= hw[0] and 0 <= x0 < x1 <= hw[1]
    assert (y1 - y0, x1 - x0) == (min(448, hw[0]), min(448, hw[1]))
    covered[y0:y1, x0:x1] += 1
  assert covered.min() >= 1
  if hw == (448, 597):
    assert boxes == [(0, 448, 0, 448), (0, 448, 149, 597)]
  assert zeroshot.window_positions(*hw, window=0, stride=0) == [(0, hw[0], 0, hw[1])]


class _EchoSegmenter(zeroshot.SlidingWindowSegmenter):
  """Scores of a crop = its normalised pixels: averaging overlapping crops must give back the image."""

  def __init__(self, protocol, image_normalization):  # pylint: disable=super-init-not-called
    self.protocol, self.image_normalization, self.crop_shapes = protocol, image_normalization, []

  def _run(self, crops):
    self.crop_shapes.append([c.shape for c in crops])
    batch = np.stack(crops)
    return batch.transpose(0, 3, 1, 2), np.zeros(batch.shape[:3], np.int32), batch.reshape(len(batch), -1).max(1)


def test_sliding_windows_average_overlaps_in_place_and_batch_across_images():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, (50, 70, 3), np.uint8), rng.integers(0, 255, (30, 30, 3), np.uint8),
            rng.integers(0, 255, (40, 33, 3), np.uint8)]
  segmenter = _EchoSegmenter(zeroshot.Protocol(short_side=40, window=32, stride=12, batch_size=4), "imagenet")
  results = list(segmenter(enumerate(images)))
  assert [k for k, _, _, _ in results] == [0, 1, 2]
  for (_, scores, groups, best), image in zip(results, images):
    resized = zeroshot.resize_bilinear(image.astype(np.float32), zeroshot.resized_shape(*image.shape[:2], 40))
    expected = zeroshot.resize_bilinear(zeroshot.normalize_image(resized, "imagenet"), image.shape[:2])
    assert scores.shape == (3,) + image.shape[:2] and groups.shape == image.shape[:2]
    assert best == pytest.approx(zeroshot.normalize_image(resized, "imagenet").max())  # the best over its crops
    np.testing.assert_allclose(scores, expected.transpose(2, 0, 1), atol=1e-5)
  assert all(len(batch) <= 4 for batch in segmenter.crop_shapes)
  assert any(len({s for s in batch}) == 1 and len(batch) == 4 for batch in segmenter.crop_shapes)


def test_whole_image_window_equals_single_pass():
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from mixreorg_jax.models import groupvit  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  model = groupvit.GroupViT.from_config(config.model)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32))
  class_emb = jnp.asarray(_unit(np.random.default_rng(0).normal(size=(5, config.model.projection_dim))),
                          jnp.float32)
  image = np.random.default_rng(1).integers(0, 255, (40, 48, 3), np.uint8)
  outputs = []
  for window, stride in ((0, 0), (64, 32), (48, 8)):  # every window covers the whole 40 x 48 image.
    protocol = zeroshot.Protocol(short_side=0, window=window, stride=stride, bg_threshold=0.9,
                                 with_background=True, batch_size=2)
    (_, scores, _, _), = list(zeroshot.SlidingWindowSegmenter(model, variables, class_emb, protocol)([("a", image)]))
    outputs.append(scores)
  assert outputs[0].shape == (6, 40, 48)
  np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-6)
  np.testing.assert_allclose(outputs[2], outputs[0], atol=1e-6)


def test_class_embeddings_average_templates_and_renormalise():
  vectors = {}

  def encode(tokens):  # a fixed random unit vector per prompt row.
    rows = [vectors.setdefault(tuple(t), _unit(np.random.default_rng(len(vectors)).normal(size=4)))
            for t in np.asarray(tokens)]
    return jnp.asarray(np.stack(rows), jnp.float32)

  tokenizer = HashTokenizer(50, 49, 8)
  templates = ["a photo of a {}.", "art of the {}.", "a {} in a video game."]
  emb = np.asarray(zeroshot.class_embeddings(encode, tokenizer, ["cat", "dog"], templates, batch_size=4))
  for c, name in enumerate(["cat", "dog"]):
    rows = tokenizer.tokenize_numpy([t.format(name) for t in templates])
    mean = np.mean([vectors[tuple(r)] for r in rows], axis=0)
    np.testing.assert_allclose(emb[c], mean / np.linalg.norm(mean), atol=1e-6)
  assert zeroshot.foreground_names(("background", "cat"), with_background=True) == ("cat",)


def test_random_assignment_is_one_hot_and_seeded():
  a = zeroshot.random_assignment(jax.random.key(1), (2, 50, 4))
  b = zeroshot.random_assignment(jax.random.key(1), (2, 50, 4))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.asarray(a).sum(-1), 1.0)
  assert len(np.unique(np.asarray(a).argmax(-1))) == 4


def test_normalize_image_uses_the_named_pixel_statistics():
  pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
  # GroupViT's mmseg eval config: img_norm_cfg mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375].
  mmseg = (pixels - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
  np.testing.assert_allclose(zeroshot.normalize_image(pixels, "imagenet"), mmseg, rtol=1e-5, atol=1e-5)
  clip = (pixels / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258,
                                                                                      0.27577711])
  np.testing.assert_allclose(zeroshot.normalize_image(pixels), clip, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="config.input.normalization"):
    zeroshot.normalize_image(pixels, "imagenet21k")
