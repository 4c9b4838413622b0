"""Micro-batch layout and draws: every micro-batch is spread over all devices, and draws match the one-shot step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixreorg_jax import micro_batch
from mixreorg_jax import mixing

LAYOUT = micro_batch.Layout(count=4, size=8, shards=2)  # B = 32: P = 16 rows per device, p = 4 per micro-batch.


def test_micro_batch_takes_a_run_of_every_device_shard_and_join_inverts_it():
  full = jnp.arange(3 * 32)  # R = 3 branches of the step's batch, branch-major.
  rows = [micro_batch.rows_of(full, jnp.int32(i), LAYOUT) for i in range(LAYOUT.count)]
  for i in range(LAYOUT.count):  # branch r, device d, row j of micro-batch i: r * B + d * P + i * p + j.
    np.testing.assert_array_equal(rows[i], [r * 32 + d * 16 + i * 4 + j for r in range(3) for d in range(2)
                                            for j in range(4)])
  np.testing.assert_array_equal(micro_batch.join(jnp.stack(rows), LAYOUT), full)


@pytest.mark.parametrize("unit", [1, 2])
def test_draw_inside_a_micro_batch_is_its_rows_of_the_full_draw(unit):
  key = jax.random.key(3)
  rows = 2 * LAYOUT.size // unit  # R = 2 branches of a micro-batch, one row per `unit` examples.
  np.testing.assert_array_equal(micro_batch.draw(jax.random.uniform, key, (rows, 5), unit),
                                jax.random.uniform(key, (rows, 5)))  # outside a micro-batch: the plain draw.
  full = jax.random.uniform(key, (rows * LAYOUT.count, 5))
  for i in range(LAYOUT.count):
    with micro_batch.drawing_rows_of(LAYOUT, jnp.int32(i)):
      ours = micro_batch.draw(jax.random.uniform, key, (rows, 5), unit)
    np.testing.assert_array_equal(ours, micro_batch.rows_of(full, jnp.int32(i), LAYOUT, unit))


def test_mixing_permutation_of_a_micro_batch_is_the_one_shot_permutation_of_its_groups():
  key, k, n = jax.random.key(0), 2, 6
  full = mixing.draw_permutation(key, 32, n, k)  # [G = 16, K, N]
  with micro_batch.drawing_rows_of(LAYOUT, jnp.int32(2)):
    ours = mixing.draw_permutation(key, LAYOUT.size, n, k)
  np.testing.assert_array_equal(ours.src, micro_batch.rows_of(full.src, jnp.int32(2), LAYOUT, unit=k))
  assert not np.array_equal(ours.src, mixing.draw_permutation(key, LAYOUT.size, n, k).src)
