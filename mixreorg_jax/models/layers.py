"""Transformer building blocks shared by the image and the text towers.

Parameter names follow the Hugging Face `transformers` GroupViT closely (`layer_norm1`, `self_attn`, `mlp.fc1`, ...)
so that public checkpoints convert with a short, explicit mapping (see `tools/convert_groupvit.py`). The one
deliberate difference is a fused `qkv_proj` in self-attention (one matmul instead of three).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixreorg_jax import micro_batch

Dtype = Any

DENSE_INIT = nn.initializers.truncated_normal(stddev=0.02)
LAYER_NORM_EPS = 1e-5


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), written as 0.5 * x * (1 + erf(x / sqrt(2))) as in torch.

  Same values as `jax.nn.gelu(x, approximate=False)` to float32 rounding, but that one goes through `erfc`, which
  XLA CPU expands into an exponential and several selects: on the reference model's MLPs ([8, 260, 1536]) the
  erf form makes the whole train step about 5% faster.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


class Dense(nn.Dense):
  """`nn.Dense` applied as one 2-D matmul: [..., C_in] is flattened to [M, C_in] and the result reshaped back.

  Same parameters and values as `nn.Dense`; on XLA CPU the 2-D form of a [B, T, C] projection and of its
  gradients runs faster than the batched form.
  """

  @nn.compact
  def __call__(self, inputs):
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(*inputs.shape[:-1], y.shape[-1])


def dense(features: int, dtype: Dtype, name: Optional[str] = None, **kwargs) -> nn.Dense:
  """A float32-parameter Dense layer computing in `dtype`."""
  return Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=DENSE_INIT, name=name, **kwargs)


def _layer_norm_fwd(x, scale, bias):
  """The LayerNorm output and what its backward needs: x, and its mean and 1 / std over C, each [..., 1]."""
  mean = jnp.mean(x, -1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), -1, keepdims=True) + LAYER_NORM_EPS)
  return (x - mean) * rstd * scale + bias, (x, mean, rstd, scale)


@jax.custom_vjp
def layer_norm_fn(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """(x - mean) / std * scale + bias over the last axis of x [..., C] (float32); scale, bias [C]."""
  return _layer_norm_fwd(x, scale, bias)[0]


def _layer_norm_bwd(residuals, dy):
  """The textbook LayerNorm gradient, dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * scale:
  two reductions over C, where autodiff of the forward pass makes XLA CPU run several more passes over x."""
  x, mean, rstd, scale = residuals
  x_hat = (x - mean) * rstd
  leading = tuple(range(x.ndim - 1))
  g = dy * scale
  dx = rstd * (g - jnp.mean(g, -1, keepdims=True) - x_hat * jnp.mean(g * x_hat, -1, keepdims=True))
  return dx, jnp.sum(dy * x_hat, leading), jnp.sum(dy, leading)


layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with `nn.LayerNorm`'s parameters (`scale`, `bias`) and epsilon 1e-5.

  Statistics and normalisation run in float32; the result is cast to `dtype`. The backward pass is written out
  (`layer_norm_fn`), which makes the reference model's train step a little faster on XLA CPU.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return layer_norm_fn(x.astype(jnp.float32), scale, bias).astype(self.dtype)


def layer_norm(name: Optional[str] = None, dtype: Dtype = jnp.float32) -> LayerNorm:
  return LayerNorm(dtype=dtype, name=name)


def drop_path(x: jax.Array, rate: float, deterministic: bool, rng: Optional[jax.Array]) -> jax.Array:
  """Stochastic depth: zeroes whole samples of a residual branch `x` [B, ...] with probability `rate`."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  # As the one-shot step's mask when micro-batched (micro_batch.draw).
  mask = micro_batch.draw(lambda k, shape: jax.random.bernoulli(k, keep, shape), rng,
                          (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2 on the last axis."""
  hidden_dim: int
  out_dim: Optional[int] = None
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_dim = self.out_dim or x.shape[-1]
    x = dense(self.hidden_dim, self.dtype, name="fc1")(x)
    x = ACTIVATIONS[self.act](x)
    return dense(out_dim, self.dtype, name="fc2")(x)


class MixerMlp(nn.Module):
  """An Mlp over the token axis: [B, S_in, C] -> [B, S_out, C] (GroupViT's token-mixing MLP)."""
  hidden_dim: int
  out_tokens: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.swapaxes(x, 1, 2)  # [B, C, S_in]
    x = Mlp(self.hidden_dim, self.out_tokens, self.act, self.dtype, name="mlp")(x)
    return jnp.swapaxes(x, 1, 2)  # [B, S_out, C]


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, C] -> [B, T, heads, C / heads]."""
  b, t, c = x.shape
  return x.reshape(b, t, num_heads, c // num_heads)


@jax.custom_vjp
def softmax_last_axis(logits: jax.Array) -> jax.Array:
  """Softmax over the last axis of float32 logits [..., S].

  The same values as `jax.nn.softmax`; its backward, y * (g - sum(y * g)), keeps only y. XLA CPU then fuses the
  forward pass (max, exp, sum, scale) into the producing matmul, instead of materialising a broadcast of 1 / sum
  for the backward pass.
  """
  e = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
  return e * (1.0 / jnp.sum(e, -1, keepdims=True))


def _softmax_fwd(logits):
  y = softmax_last_axis(logits)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - jnp.sum(y * g, -1, keepdims=True)),)


softmax_last_axis.defvjp(_softmax_fwd, _softmax_bwd)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False) -> jax.Array:
  """Softmax attention of q [B, T, heads, D] over k, v [B, S, heads, D] -> [B, T, heads, D].

  `jax.nn.dot_product_attention` on accelerators (fused kernels where available). On CPU, the same arithmetic
  written as head-major batched matmuls: XLA CPU runs [B, heads, T, D] batched dots and their gradients
  markedly faster than the [B, T, heads, D] form that `dot_product_attention` lowers to there.
  """
  if jax.default_backend() != "cpu":
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, heads, T|S, D]
  logits = jnp.einsum("bhtd,bhsd->bhts", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k)
  if causal:
    t, s = logits.shape[-2:]
    logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, jnp.finfo(logits.dtype).min)
  weights = softmax_last_axis(logits.astype(jnp.float32)).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", weights, v), 1, 2)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection; optionally causal."""
  num_heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, c = x.shape
    qkv = dense(3 * c, self.dtype, name="qkv_proj")(x)  # [B, T, 3C]
    q, k, v = (_split_heads(y, self.num_heads) for y in jnp.split(qkv, 3, axis=-1))
    out = multi_head_attention(q, k, v, self.causal)  # [B, T, heads, C / heads]
    return dense(c, self.dtype, name="out_proj")(out.reshape(b, t, c))


class CrossAttention(nn.Module):
  """Multi-head attention from `query` [B, S, C] to `context` [B, N, C]."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, context):
    b, s, c = query.shape
    q = _split_heads(dense(c, self.dtype, name="q_proj")(query), self.num_heads)
    kv = dense(2 * c, self.dtype, name="kv_proj")(context)
    k, v = (_split_heads(y, self.num_heads) for y in jnp.split(kv, 2, axis=-1))
    out = multi_head_attention(q, k, v)
    return dense(c, self.dtype, name="out_proj")(out.reshape(b, s, c))


class EncoderLayer(nn.Module):
  """Pre-norm Transformer block: x + attn(LN(x)), then x + mlp(LN(x)), with stochastic depth."""
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  causal: bool = False
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    deterministic = not train or self.drop_path_rate == 0.0
    rng = lambda: None if deterministic else self.make_rng("dropout")  # noqa: E731
    y = SelfAttention(self.num_heads, self.causal, self.dtype, name="self_attn")(layer_norm("layer_norm1")(x))
    x = x + drop_path(y, self.drop_path_rate, deterministic, rng())
    y = Mlp(self.mlp_dim, act=self.act, dtype=self.dtype, name="mlp")(layer_norm("layer_norm2")(x))
    return x + drop_path(y, self.drop_path_rate, deterministic, rng())


def encoder_layer_cls(remat: bool):
  """EncoderLayer, rematerialised per block when `remat` (config.model.remat)."""
  return nn.remat(EncoderLayer, static_argnums=(2,)) if remat else EncoderLayer


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of 1-D bicubic resizing as torch's `interpolate(mode='bicubic', align_corners=False)`.

  Uses the Keys kernel with a = -0.75 and border clamping, which is what GroupViT (and DINO-style ViTs) use to
  resize position embeddings; `jax.image.resize` uses a = -0.5, so it would not reproduce converted checkpoints.
  """
  a = -0.75

  def kernel(d):
    d = abs(d)
    if d <= 1:
      return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
      return (((d - 5) * d + 8) * d - 4) * a
    return 0.0

  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = (o + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for offset in range(-1, 3):
      weights[o, min(max(base + offset, 0), in_size - 1)] += kernel(offset - t)
  return weights.astype(np.float32)
