"""GroupViT's grouping block: group tokens take over the image tokens assigned to them.

The block (GroupViT Sec. 3.1; `GroupViTTokenAssign` in transformers) is:
LayerNorm on both token sets -> token-mixing MLP S_in -> S_out group tokens -> cross-attention from the group
tokens to the image tokens -> single-head *assignment attention* whose softmax runs over the **group** axis, so
every image token is assigned to exactly one group -> new segment tokens = proj(A @ v) + group tokens, then a
channel MLP.
"""
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixreorg_jax import micro_batch
from mixreorg_jax.models import layers

Dtype = Any


class Assignment(NamedTuple):
  """Patch-to-group assignments of one grouping block; both are [B, N_in, S_out] and sum to 1 over groups."""
  soft: jax.Array  # softmax over groups, no noise: what zero-shot segmentation uses.
  hard: jax.Array  # straight-through one-hot used in the forward pass (Gumbel in training, argmax in eval).


def patch_to_segment(assignments) -> jax.Array:
  """Chains per-stage assignments [B, N, S1], [B, S1, S2], ... into patch-to-final-segment A [B, N, G]."""
  a = assignments[0]
  for nxt in assignments[1:]:
    a = jnp.einsum("bns,bsg->bng", a, nxt)
  return a


def straight_through_one_hot(y_soft: jax.Array, axis: int) -> jax.Array:
  """One-hot of argmax(y_soft) in the forward pass, gradient of y_soft in the backward pass."""
  y_hard = jax.nn.one_hot(jnp.argmax(y_soft, axis=axis), y_soft.shape[axis], axis=axis, dtype=y_soft.dtype)
  return y_hard - jax.lax.stop_gradient(y_soft) + y_soft


def assignment_probs(logits: jax.Array, axis: int, *, hard: bool, gumbel_rng: Optional[jax.Array],
                     tau: float = 1.0) -> jax.Array:
  """Assignment over `axis` of `logits`: Gumbel-softmax if `gumbel_rng` is given, else plain softmax.

  With `hard`, the result is the straight-through one-hot (y_hard - stop_grad(y_soft) + y_soft).
  """
  logits = logits.astype(jnp.float32)
  if gumbel_rng is not None:
    # As the one-shot step's noise when micro-batched (micro_batch.draw).
    noise = micro_batch.draw(lambda k, shape: jax.random.gumbel(k, shape, jnp.float32), gumbel_rng, logits.shape)
    logits = (logits + noise) / tau
  y_soft = jax.nn.softmax(logits, axis=axis)
  return straight_through_one_hot(y_soft, axis) if hard else y_soft


class AssignAttention(nn.Module):
  """Single-head attention from S group tokens to N image tokens, normalised over groups.

  Returns (out [B, S, C], soft [B, S, N], hard [B, S, N]).
  """
  assign_eps: float = 1.0
  hard: bool = True
  gumbel: bool = True
  gumbel_tau: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, key, train: bool = False):
    c = query.shape[-1]
    q = layers.dense(c, self.dtype, name="q_proj")(query)  # [B, S, C]
    k = layers.dense(c, self.dtype, name="k_proj")(key)  # [B, N, C]
    v = layers.dense(c, self.dtype, name="v_proj")(key)  # [B, N, C]
    logits = jnp.einsum("bsc,bnc->bsn", q, k) * (c ** -0.5)  # [B, S, N]
    rng = self.make_rng("gumbel") if (train and self.gumbel) else None
    attn = assignment_probs(logits, axis=1, hard=self.hard, gumbel_rng=rng, tau=self.gumbel_tau)
    soft = jax.nn.softmax(logits.astype(jnp.float32), axis=1)
    # Normalise per group by (sum + eps); GroupViT#17: eps=1 is stable, 1e-10 diverges.
    weights = attn / (attn.sum(axis=-1, keepdims=True) + self.assign_eps)
    out = jnp.einsum("bsn,bnc->bsc", weights.astype(v.dtype), v)
    return layers.dense(c, self.dtype, name="proj")(out), soft, attn


class CrossAttentionLayer(nn.Module):
  """Group tokens attend to image tokens: x + attn(x, ctx), x + mlp(LN(x)), LN."""
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, context):
    x = query + layers.CrossAttention(self.num_heads, self.dtype, name="attn")(query, context)
    x = x + layers.Mlp(self.mlp_dim, act=self.act, dtype=self.dtype, name="mlp")(layers.layer_norm("norm2")(x))
    return layers.layer_norm("norm_post")(x)


class GroupingBlock(nn.Module):
  """Merges N image tokens into S_out segment tokens under S_in group tokens.

  Call: (image_tokens [B, N, C], group_tokens [B, S_in, C]) -> (segments [B, S_out, C], Assignment [B, N, S_out]).
  """
  num_heads: int
  num_output_groups: int
  mlp_dim: int
  assign_mlp_ratio: Sequence[float] = (0.5, 4.0)
  assign_eps: float = 1.0
  hard_assignment: bool = True
  gumbel: bool = True
  gumbel_tau: float = 1.0
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_tokens, group_tokens, train: bool = False):
    c = image_tokens.shape[-1]
    tokens_dim, channels_dim = (int(r * c) for r in self.assign_mlp_ratio)
    group_tokens = layers.layer_norm("norm_tokens")(group_tokens)
    image_tokens = layers.layer_norm("norm_x")(image_tokens)
    # [B, S_in, C] -> [B, S_out, C]
    projected = layers.MixerMlp(tokens_dim, self.num_output_groups, self.act, self.dtype,
                                name="mlp_inter")(group_tokens)
    projected = layers.layer_norm("norm_post_tokens")(projected)
    projected = CrossAttentionLayer(self.num_heads, self.mlp_dim, self.act, self.dtype,
                                    name="pre_assign_attn")(projected, image_tokens)
    out, soft, hard = AssignAttention(self.assign_eps, self.hard_assignment, self.gumbel, self.gumbel_tau,
                                      self.dtype, name="assign")(projected, image_tokens, train)
    out = out + projected
    out = out + layers.Mlp(channels_dim, c, self.act, self.dtype, name="mlp_channels")(
        layers.layer_norm("norm_new_x")(out))
    # Assignments are returned patch-major, [B, N, S_out].
    return out, Assignment(jnp.swapaxes(soft, 1, 2), jnp.swapaxes(hard, 1, 2))
