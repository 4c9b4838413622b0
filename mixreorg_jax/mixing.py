"""Patch mixing across images and its exact inverse, as pure on-device gathers (MixReorg Sec. 3.2).

Images are taken in groups of K consecutive examples. For every group and every patch position p a permutation
sigma_p of the K images is drawn; mixed image j takes, at position p, the token of image sigma_p(j). Its label is
`src[j, p] = sigma_p(j)`. Every token lands in exactly one mixed image, so `restore` inverts the mix exactly.

Groups never straddle devices as long as K divides the per-device batch, so under `jax.jit` with the batch
sharded over the mesh these gathers compile to purely local ops (tests/test_mixing.py checks the HLO).
"""
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from mixreorg_jax import micro_batch


class MixPermutation(NamedTuple):
  """Per-token source indices within a group, both int32 [G, K, N] with values in [0, K); K = shape[1]."""
  src: jax.Array  # mixed[g*K + j, p] = tokens[g*K + src[g, j, p], p]
  inverse: jax.Array  # tokens[g*K + k, p] = mixed[g*K + inverse[g, k, p], p]

  @property
  def group_size(self) -> int:
    return self.src.shape[1]

  def labels(self) -> jax.Array:
    """src as per-example labels [B, N]: which image of its group each mixed token came from."""
    g, k, n = self.src.shape
    return self.src.reshape(g * k, n)


def check_group_size(batch_size: int, group_size: int, what: str = "batch") -> None:
  """Raises a ValueError naming `config.mix.group_size` unless K >= 1 divides `batch_size`."""
  if group_size < 1 or batch_size % group_size:
    raise ValueError(
        f"config.mix.group_size={group_size} must divide the {what} size {batch_size}; mixing groups are "
        f"consecutive examples and must not straddle devices. Change config.mix.group_size or "
        f"config.input.batch_size.")


def draw_permutation(key: jax.Array, batch_size: int, num_tokens: int, group_size: int) -> MixPermutation:
  """Draws an independent permutation of the K images of each group at each position."""
  check_group_size(batch_size, group_size)
  groups = batch_size // group_size
  # argsort of i.i.d. uniforms is a uniformly random permutation: [G, N, K].
  # One row per group; when micro-batched, the one-shot step's rows of this micro-batch (micro_batch.draw).
  uniform = micro_batch.draw(jax.random.uniform, key, (groups, num_tokens, group_size), unit=group_size)
  sigma = jnp.argsort(uniform, axis=-1).astype(jnp.int32)
  inverse = jnp.argsort(sigma, axis=-1).astype(jnp.int32)
  return MixPermutation(jnp.transpose(sigma, (0, 2, 1)), jnp.transpose(inverse, (0, 2, 1)))  # [G, K, N]


def _gather(tokens: jax.Array, index: jax.Array) -> jax.Array:
  b, n, c = tokens.shape
  groups, k, _ = index.shape
  check_group_size(b, k)
  out = jnp.take_along_axis(tokens.reshape(groups, k, n, c), index[..., None], axis=1, mode="promise_in_bounds")
  return out.reshape(b, n, c)


@jax.custom_vjp
def _permute(tokens: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """out[g*K + j, p] = tokens[g*K + index[g, j, p], p]; tokens [B, N, C], index/inverse [G, K, N].

  `index` is a permutation within each group and position, so the gradient is the gather by its inverse: the
  backward pass is another gather instead of the scatter-add XLA would emit for a general gather.
  """
  return _gather(tokens, index)


def _permute_fwd(tokens, index, inverse):
  return _gather(tokens, index), (index, inverse)


def _permute_bwd(residuals, cotangent):
  index, inverse = residuals
  return _gather(cotangent, inverse), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def apply_mix(tokens: jax.Array, perm: MixPermutation) -> jax.Array:
  """Mix_sigma(tokens): [B, N, C] -> [B, N, C] with the permutation already drawn."""
  return _permute(tokens, perm.src, perm.inverse)


def mix(tokens: jax.Array, key: jax.Array, group_size: int) -> Tuple[jax.Array, jax.Array, MixPermutation]:
  """tokens [B, N, C] -> (mixed [B, N, C], src [B, N] in [0, K), perm for `restore`)."""
  perm = draw_permutation(key, tokens.shape[0], tokens.shape[1], group_size)
  return apply_mix(tokens, perm), perm.labels(), perm


def restore(mixed: jax.Array, perm: MixPermutation) -> jax.Array:
  """Unmix_sigma: puts every mixed token back at its original image and position. [B, N, C] -> [B, N, C]."""
  return _permute(mixed, perm.inverse, perm.src)
