"""The two-tower GroupViT model: image tower, text tower, MLP projectors and a learned logit scale.

`GroupViT.from_config(config.model)` builds it from the `model` block of a config (see configs/*.py).
"""
import math
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mixreorg_jax.models import grouping
from mixreorg_jax.models import layers
from mixreorg_jax.models import text as text_lib
from mixreorg_jax.models import vision as vision_lib

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


class BatchNorm(nn.Module):
  """BatchNorm over all leading axes, with the choice not to update the running statistics.

  The image projector is applied both to pooled image features and to segment tokens (for L_seg); only the
  pooled call updates the running statistics, so that inference sees the statistics GroupViT's would. In
  training, the segment call normalises with the pooled features' batch statistics (`statistics_of`): at
  inference both use the running statistics of the pooled features, so L_seg trains the segment embeddings that
  zero-shot segmentation reads (on the demo's tuning split, trained with the segments' own statistics, 22% of
  the object segments were classified correctly at inference; trained with the pooled ones, 54%).
  """
  momentum: float = 0.9  # torch BatchNorm1d momentum 0.1.
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool, update_stats: bool = True, statistics_of: Optional[jax.Array] = None):
    """x: [..., C]. In training, normalises with the batch statistics of `statistics_of` [..., C] (default x)."""
    c = x.shape[-1]
    mean_var = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    var_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      ref = x32 if statistics_of is None else statistics_of.astype(jnp.float32)
      axes = tuple(range(ref.ndim - 1))
      mean = ref.mean(axes)
      var = jnp.square(ref - mean).mean(axes)
      if update_stats and not self.is_initializing():
        n = ref.size // c
        mean_var.value = self.momentum * mean_var.value + (1 - self.momentum) * mean
        # Running variance is unbiased, as torch's.
        var_var.value = self.momentum * var_var.value + (1 - self.momentum) * var * n / max(n - 1, 1)
    else:
      mean, var = mean_var.value, var_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


class Projector(nn.Module):
  """Linear -> BatchNorm -> ReLU -> Linear (GroupViT's 2-layer projection MLP). [..., C] -> [..., D]."""
  hidden_dim: int = 4096
  out_dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, update_stats: bool = True, statistics_of: Optional[jax.Array] = None):
    """x: [..., C] -> [..., D]. statistics_of: [..., C] whose hidden batch statistics normalise x (default x)."""
    dense = layers.dense(self.hidden_dim, self.dtype, name="linear_0")
    x = dense(x)
    ref = None if statistics_of is None else dense(statistics_of)
    x = nn.relu(BatchNorm(name="batchnorm")(x, train, update_stats, ref))
    return layers.dense(self.out_dim, self.dtype, name="linear_1")(x)


class ImageEncoding(NamedTuple):
  embedding: jax.Array  # [B, D], L2-normalised: projection of the mean of the final segment tokens.
  segment_embeddings: jax.Array  # [B, G, D], L2-normalised projections of each segment token.
  assignments: Tuple[grouping.Assignment, ...]  # per grouping stage, [B, N_in, S_out].
  grid: Tuple[int, int]


class GroupViT(nn.Module):
  """Image tower + text tower + projectors + logit scale(s)."""
  vision_model: vision_lib.GroupViTVision
  text_model: text_lib.TextTransformer
  projection_dim: int = 256
  projection_hidden_dim: int = 4096
  logit_scale_init: float = math.log(1 / 0.07)
  logit_scale_max: float = 100.0
  multi_label: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    self.visual_projection = Projector(self.projection_hidden_dim, self.projection_dim, self.dtype)
    self.text_projection = Projector(self.projection_hidden_dim, self.projection_dim, self.dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32)
    if self.multi_label:
      self.multi_label_logit_scale = self.param(
          "multi_label_logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32)

  @classmethod
  def from_config(cls, model_config: ml_collections.ConfigDict) -> "GroupViT":
    """Builds the model from `config.model` (see configs/demo.py for the keys)."""
    m = model_config
    dtype = DTYPES[m.dtype] if m.dtype in DTYPES else None
    if dtype is None:
      raise ValueError(f"config.model.dtype={m.dtype!r}; expected one of {sorted(DTYPES)}.")
    v, t = m.vision, m.text
    vision = vision_lib.GroupViTVision(
        width=v.width, num_heads=v.num_heads, depths=tuple(v.depths), num_group_tokens=tuple(v.num_group_tokens),
        num_output_groups=tuple(v.num_output_groups), patch_size=v.patch_size, image_size=v.image_size,
        mlp_ratio=v.mlp_ratio, assign_mlp_ratio=tuple(v.assign_mlp_ratio), assign_eps=v.assign_eps,
        hard_assignment=v.hard_assignment, gumbel=v.gumbel, gumbel_tau=v.gumbel_tau,
        drop_path_rate=v.drop_path_rate, act=v.act, remat=m.remat, dtype=dtype, parent=None)
    text = text_lib.TextTransformer(
        vocab_size=t.vocab_size, width=t.width, num_layers=t.num_layers, num_heads=t.num_heads, mlp_dim=t.mlp_dim,
        context_length=t.context_length, eot_id=t.eot_id, act=t.act, remat=m.remat, dtype=dtype, parent=None)
    return cls(vision, text, m.projection_dim, m.projection_hidden_dim, m.logit_scale_init, m.logit_scale_max,
               m.multi_label, dtype)

  def scale(self, name: str = "logit_scale") -> jax.Array:
    """exp(learned log-scale), clamped at logit_scale_max (CLIP/GroupViT)."""
    return jnp.minimum(jnp.exp(getattr(self, name)), self.logit_scale_max)

  def project_segments(self, segment_tokens, train: bool = False, update_stats: bool = True):
    """Final segment tokens [B, G, C] -> (image embedding [B, D], segment embeddings [B, G, D]), normalised."""
    mean_tokens = segment_tokens.mean(axis=1)
    pooled = self.visual_projection(mean_tokens, train, update_stats)
    # Segments are normalised with the pooled features' statistics, in training as at inference.
    segments = self.visual_projection(segment_tokens, train, update_stats=False, statistics_of=mean_tokens)
    return l2_normalize(pooled), l2_normalize(segments)

  def encode_image(self, images, train: bool = False) -> ImageEncoding:
    out = self.vision_model(images, train)
    embedding, segment_embeddings = self.project_segments(out.segment_tokens, train)
    return ImageEncoding(embedding, segment_embeddings, out.assignments, out.grid)

  def encode_text(self, tokens, train: bool = False) -> jax.Array:
    """tokens int32 [..., L] -> [..., D], L2-normalised."""
    return self.project_text(self.text_features(tokens, train), train)

  def text_features(self, tokens, train: bool = False) -> jax.Array:
    """The text tower before its projector: tokens int32 [..., L] -> pooled features [..., C]."""
    lead = tokens.shape[:-1]
    return self.text_model(tokens.reshape(-1, tokens.shape[-1]), train).reshape(lead + (-1,))

  def project_text(self, features, train: bool = False) -> jax.Array:
    """Text features [..., C] -> embeddings [..., D], L2-normalised; BatchNorm over all leading axes."""
    lead = features.shape[:-1]
    flat = features.reshape(-1, features.shape[-1])
    return l2_normalize(self.text_projection(flat, train)).reshape(lead + (-1,))

  def __call__(self, images, tokens, train: bool = False):
    """-> (image ImageEncoding, text embeddings [B, D], logits_per_image [B, B])."""
    image = self.encode_image(images, train)
    text = self.encode_text(tokens, train)
    if self.multi_label:  # Touch the parameter so init creates it.
      _ = self.scale("multi_label_logit_scale")
    return image, text, self.scale() * image.embedding @ text.T
