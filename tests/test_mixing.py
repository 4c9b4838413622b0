"""Mixing is an exact, device-local permutation of tokens within groups of K images."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mixreorg_jax import mixing
from mixreorg_jax import sharding


@pytest.mark.parametrize("k", [2, 3, 4])
def test_restore_inverts_mix_exactly(k):
  tokens = jax.random.normal(jax.random.key(0), (4 * k, 10, 6))
  mixed, src, perm = mixing.mix(tokens, jax.random.key(1), k)
  np.testing.assert_array_equal(mixing.restore(mixed, perm), tokens)
  assert src.shape == (4 * k, 10) and int(src.min()) >= 0 and int(src.max()) < k


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mixed_tokens_come_from_src_and_each_token_appears_once(k):
  b, n = 3 * k, 12
  tokens = jnp.arange(b * n, dtype=jnp.float32).reshape(b, n, 1)  # every token unique
  mixed, src, _ = mixing.mix(tokens, jax.random.key(2), k)
  i = np.arange(b)[:, None]
  p = np.arange(n)[None, :]
  np.testing.assert_array_equal(mixed[..., 0], np.asarray(tokens)[(i // k) * k + np.asarray(src), p, 0])
  for g in range(b // k):
    group = np.asarray(mixed[g * k:(g + 1) * k, :, 0])
    original = np.asarray(tokens[g * k:(g + 1) * k, :, 0])
    for pos in range(n):  # a permutation of the K tokens at this position
      assert sorted(group[:, pos]) == sorted(original[:, pos])


def test_permutations_vary_over_positions_and_groups():
  _, src, _ = mixing.mix(jnp.zeros((64, 49, 1)), jax.random.key(3), 2)
  src = np.asarray(src)
  assert 0.4 < src.mean() < 0.6  # both source images used about equally
  assert len({tuple(row) for row in src}) > 10


def test_group_size_must_divide_batch():
  with pytest.raises(ValueError, match="config.mix.group_size"):
    mixing.mix(jnp.zeros((6, 4, 2)), jax.random.key(0), 4)


def test_mix_and_restore_compile_without_collectives():
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 8, "fsdp": 1}))
  assert mesh.size == 8
  batch = sharding.batch_sharding(mesh)
  tokens = jax.device_put(jnp.ones((32, 16, 8)), batch)

  def mix_restore(x, key):
    mixed, src, perm = mixing.mix(x, key, 2)
    blended = 0.5 * mixed + 0.5 * mixing.apply_mix(x, perm)
    return blended, mixing.restore(mixed, perm), src

  hlo = jax.jit(mix_restore, out_shardings=(batch, batch, batch)).lower(tokens, jax.random.key(0)).compile().as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter"):
    assert op not in hlo, f"{op} in the compiled mixing"


def test_gradient_of_mix_is_the_inverse_permutation():
  tokens = jax.random.normal(jax.random.key(0), (6, 5, 4))
  perm = mixing.draw_permutation(jax.random.key(1), 6, 5, 3)
  weights = jax.random.normal(jax.random.key(2), (6, 5, 4))
  loss = lambda x: jnp.sum(weights * mixing.apply_mix(x, perm) ** 2)  # noqa: E731
  reference = lambda x: jnp.sum(weights * mixing._gather(x, perm.src) ** 2)  # noqa: E731  autodiff of the gather
  np.testing.assert_allclose(jax.grad(loss)(tokens), jax.grad(reference)(tokens), rtol=1e-6)
  restored = lambda x: jnp.sum(weights * mixing.restore(x, perm) ** 2)  # noqa: E731
  reference = lambda x: jnp.sum(weights * mixing._gather(x, perm.inverse) ** 2)  # noqa: E731
  np.testing.assert_allclose(jax.grad(restored)(tokens), jax.grad(reference)(tokens), rtol=1e-6)
