"""Where a micro-batch sits in the step's batch, and random draws that do not depend on the micro-batching.

Exact contrastive micro-batching (gradient caching, Gao et al. 2021; train_step.micro_batched_grads) runs the
towers over micro-batches of b = B / n examples of the step's B. So that every micro-batch is spread over all D
devices that hold the batch (D = mesh size), micro-batch i takes from each device's shard of P = B / D rows the
i-th run of p = b / D rows:

  rows of micro-batch i = { d * P + i * p + j : d < D, j < p }            (its row d * p + j)

A tower sees R * b rows when it runs R branches of the micro-batch side by side (MixReorg's [original; mixed;
restored] is R = 3); the full step's batch is then R * B rows in the same branch-major order.

The random draws of the towers (mixing permutations, Gumbel noise, drop-path) must be those of the one-shot step,
and the same in both passes of a micro-batch. `draw` gives that: inside `drawing_rows_of(layout, i)` it draws for
the full step's batch and keeps micro-batch i's rows, and outside it is the plain draw. The position travels as
context rather than as an argument because the draws sit deep inside Flax modules (every Transformer block and
grouping block) and micro-batching is a training-only concern of the step.
"""
import contextlib
import threading
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
  """How the step's batch of `count * size` examples splits into micro-batches (all static)."""
  count: int  # n micro-batches per step.
  size: int  # b examples per micro-batch (over all devices).
  shards: int  # D devices the batch axis is split over.

  def rows_per_shard(self, unit: int = 1) -> int:
    """p: rows of one micro-batch on one device, for rows of `unit` consecutive examples (a mixing group)."""
    return self.size // (self.shards * unit)


def rows_of(x: jax.Array, index: jax.Array, layout: Layout, unit: int = 1) -> jax.Array:
  """Micro-batch `index`'s rows of a full-step array. [R * B / unit, ...] -> [R * b / unit, ...].

  unit: examples per row (1 for per-example arrays, K for per-mixing-group arrays).
  """
  p = layout.rows_per_shard(unit)
  blocks = x.reshape((-1, layout.shards, layout.count, p) + x.shape[1:])  # [R, D, n, p, ...]
  return jax.lax.dynamic_index_in_dim(blocks, index, axis=2, keepdims=False).reshape((-1,) + x.shape[1:])


def join(stacked: jax.Array, layout: Layout) -> jax.Array:
  """The inverse of `rows_of` over all micro-batches: [n, R * b, ...] -> the full step's [R * B, ...]."""
  p = layout.rows_per_shard()
  blocks = stacked.reshape((layout.count, -1, layout.shards, p) + stacked.shape[2:])  # [n, R, D, p, ...]
  return jnp.moveaxis(blocks, 0, 2).reshape((-1,) + stacked.shape[2:])  # [R, D, n, p, ...] -> [R * B, ...]


class _Position(threading.local):
  layout: Optional[Layout] = None
  index: Optional[jax.Array] = None


_position = _Position()


@contextlib.contextmanager
def drawing_rows_of(layout: Layout, index: jax.Array):
  """Makes every `draw` traced inside the block return micro-batch `index`'s rows of the full step's draw."""
  previous = (_position.layout, _position.index)
  _position.layout, _position.index = layout, index
  try:
    yield
  finally:
    _position.layout, _position.index = previous


def draw(sample: Callable[[jax.Array, Sequence[int]], jax.Array], key: jax.Array, shape: Sequence[int],
         unit: int = 1) -> jax.Array:
  """sample(key, shape) with shape [R * b / unit, ...], as the rows of the one-shot step's draw.

  Outside `drawing_rows_of` this is sample(key, shape). Inside, the full step's [R * B / unit, ...] is drawn and
  micro-batch i's rows are kept, so a micro-batch gets exactly the numbers its examples get in the one-shot step.
  """
  layout = _position.layout
  if layout is None:
    return sample(key, tuple(shape))
  full_rows = shape[0] * layout.count
  return rows_of(sample(key, (full_rows,) + tuple(shape[1:])), _position.index, layout, unit)
