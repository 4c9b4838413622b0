"""The causal text Transformer (CLIP-style), pooled at the end-of-text token."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixreorg_jax.models import layers

Dtype = Any


def eot_positions(tokens: jax.Array, eot_id: int) -> jax.Array:
  """[B, L] int -> [B], index of the first `eot_id` in each row (the tokenizer guarantees there is one)."""
  return jnp.argmax(tokens == eot_id, axis=-1)


class TextTransformer(nn.Module):
  """tokens int32 [B, L] -> pooled features [B, C] at the end-of-text token."""
  vocab_size: int = 49408
  width: int = 256
  num_layers: int = 12
  num_heads: int = 4
  mlp_dim: int = 1024
  context_length: int = 77
  eot_id: int = 49407
  act: str = "quick_gelu"
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    if tokens.shape[-1] > self.context_length:
      raise ValueError(f"Text length {tokens.shape[-1]} exceeds config.model.text.context_length "
                       f"{self.context_length}.")
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 param_dtype=jnp.float32, name="token_embedding")(tokens)
    pos = nn.Embed(self.context_length, self.width, embedding_init=nn.initializers.normal(0.01),
                   param_dtype=jnp.float32, name="position_embedding")(jnp.arange(tokens.shape[-1]))
    x = (x + pos[None]).astype(self.dtype)  # [B, L, C]
    layer_cls = layers.encoder_layer_cls(self.remat)
    for i in range(self.num_layers):
      x = layer_cls(self.num_heads, self.mlp_dim, self.act, True, 0.0, self.dtype, name=f"layers_{i}")(x, train)
    x = layers.layer_norm("final_layer_norm")(x)
    return x[jnp.arange(x.shape[0]), eot_positions(tokens, self.eot_id)]  # [B, C]
