"""Train state and the jitted, sharded MixReorg / GroupViT train step.

One step: split the rng, run the MixReorg forward (mixreorg.forward), differentiate the total loss, apply AdamW,
and skip the update if the loss or any gradient is non-finite (GroupViT#43). The step is one `jax.jit` with
NamedSharding in/out shardings; the state is donated.
"""
import functools
from typing import Any, Callable, Dict, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mixreorg_jax import mixing
from mixreorg_jax import mixreorg
from mixreorg_jax import sharding
from mixreorg_jax.models import groupvit

RNG_STREAMS = ("mix", "gumbel", "dropout")


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of steps taken (updates applied or skipped).
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # base key; step s uses fold_in(rng, s).
  consecutive_skips: jax.Array  # int32: non-finite steps in a row.
  skipped_steps: jax.Array  # int32: all non-finite steps so far.


def example_batch(config: ml_collections.ConfigDict, batch_size: int) -> Dict[str, jax.Array]:
  """Zeros shaped like an input batch (used to initialise and to trace)."""
  size, length = config.input.image_size, config.input.context_length
  batch = {"image": jnp.zeros((batch_size, size, size, 3), jnp.float32),
           "text": jnp.zeros((batch_size, length), jnp.int32)}
  if config.model.multi_label:
    noun_length = config.input.noun_context_length or length
    batch["nouns"] = jnp.zeros((batch_size, config.input.num_nouns, noun_length), jnp.int32)
  return batch


def init_variables(config, model: groupvit.GroupViT, rng: jax.Array) -> Dict[str, Any]:
  """The untrained {"params", "batch_stats"} that `init_state(..., rng)` starts from (same rng, same values)."""
  init_rng, _ = jax.random.split(rng)
  batch = example_batch(config, 2)
  variables = model.init({"params": init_rng}, batch["image"], batch["text"])
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def init_state(config, model: groupvit.GroupViT, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """Initialises parameters (float32), batch statistics and optimiser state."""
  _, state_rng = jax.random.split(rng)
  variables = init_variables(config, model, rng)
  params = variables["params"]
  zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  distinct buffers, as the state is donated.
  return TrainState(step=zero(), params=params, batch_stats=variables["batch_stats"], opt_state=tx.init(params),
                    rng=jax.random.key_data(state_rng), consecutive_skips=zero(), skipped_steps=zero())


def step_rngs(base_rng: jax.Array, step: jax.Array) -> Dict[str, jax.Array]:
  """One independent key per random stream for this step."""
  keys = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(base_rng), step), len(RNG_STREAMS))
  return dict(zip(RNG_STREAMS, keys))


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, model: groupvit.GroupViT,
               tx: optax.GradientTransformation, schedule: Callable, config: ml_collections.ConfigDict
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One update. Returns the new state and scalar metrics (all on device; nothing syncs with the host)."""
  rngs = step_rngs(state.rng, state.step)

  def loss_fn(params):
    out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch, config, True,
                               method=mixreorg.forward, rngs=rngs, mutable=["batch_stats"])
    return out["loss"], (out, updates["batch_stats"])

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if config.debug_nan_step >= 0:  # Test hook for the NaN guard; absent from the compiled step otherwise.
    # Poisons config.debug_nan_steps (default 1) steps from step debug_nan_step on (halting needs a run of them).
    first = config.debug_nan_step
    poisoned = (state.step >= first) & (state.step < first + config.debug_nan_steps)
    grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN/inf anywhere makes the norm non-finite.

  def apply_update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), batch_stats, opt_state

  def skip_update(_):
    return state.params, state.batch_stats, state.opt_state

  params, batch_stats, opt_state = jax.lax.cond(finite, apply_update, skip_update, None)
  skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      consecutive_skips=(state.consecutive_skips + 1) * skipped,
      skipped_steps=state.skipped_steps + skipped)
  metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step), skipped=skipped,
                 consecutive_skips=new_state.consecutive_skips)
  return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


def abstract_state(config, model, tx) -> TrainState:
  return jax.eval_shape(lambda: init_state(config, model, tx, jax.random.key(0)))


def jit_train_step(config, model, tx, schedule, mesh: Mesh, state_shardings) -> Callable:
  """The sharded step: state sharded per `state_shardings`, batch split over all devices, metrics replicated."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config)
  batch_spec = jax.tree.map(lambda _: sharding.batch_sharding(mesh), example_batch(config, 1))
  return jax.jit(step, in_shardings=(state_shardings, batch_spec),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_init_state(config, model, tx, state_shardings) -> Callable:
  """rng -> TrainState created directly in its sharded layout (no host copy of the parameters); None = default."""
  return jax.jit(functools.partial(init_state, config, model, tx), out_shardings=state_shardings)


def check_batch(config, mesh: Mesh) -> None:
  """Fails before compiling if the batch does not split over devices or K does not divide the device batch."""
  per_device = sharding.per_device_batch(mesh, config.input.batch_size)
  if config.model.mixreorg:
    mixing.check_group_size(per_device, config.mix.group_size, what="per-device batch")
