"""Train state and the jitted, sharded MixReorg / GroupViT train step.

One step: split the rng, run the MixReorg forward (mixreorg.forward), differentiate the total loss, apply AdamW,
update the parameters' moving average (config.optim.ema_decay > 0), and skip the update if the loss or any
gradient is non-finite (GroupViT#43). The step is one `jax.jit` with
NamedSharding in/out shardings; the state is donated. With config.input.micro_batch_size the same gradient is
computed a micro-batch at a time (gradient caching, `micro_batched_grads`), for batches the devices cannot hold.
"""
import functools
from typing import Any, Callable, Dict, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mixreorg_jax import micro_batch
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
  # The exponential moving average of `params` that evaluations and exports use (config.optim.ema_decay > 0);
  # None when off.
  ema_params: Any = None


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
  ema_params = jax.tree.map(jnp.copy, params) if ema_decay(config) else None
  return TrainState(step=zero(), params=params, batch_stats=variables["batch_stats"], opt_state=tx.init(params),
                    rng=jax.random.key_data(state_rng), consecutive_skips=zero(), skipped_steps=zero(),
                    ema_params=ema_params)


def ema_decay(config: ml_collections.ConfigDict) -> float:
  """config.optim.ema_decay; 0 (no moving average) for configs written before the key existed."""
  return config.optim.get("ema_decay", 0.0)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The averaging weight of the update that `step` (0-based) makes: min(decay, (1 + step) / (10 + step)).

  The ramp is TensorFlow's ExponentialMovingAverage with num_updates: early on, when the average still holds the
  initial parameters, it follows the trained ones closely.
  """
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def updated_ema(ema_params, params, decay: jax.Array):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf (float32)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def step_rngs(base_rng: jax.Array, step: jax.Array) -> Dict[str, jax.Array]:
  """One independent key per random stream for this step."""
  keys = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(base_rng), step), len(RNG_STREAMS))
  return dict(zip(RNG_STREAMS, keys))


def one_shot_grads(params, batch_stats, batch: Dict[str, jax.Array], rngs: Dict[str, jax.Array], *,
                   model: groupvit.GroupViT, config: ml_collections.ConfigDict) -> Tuple[jax.Array, Any, Any, Any]:
  """The loss of the whole batch and its gradient in one forward and backward pass.

  -> (loss, metrics, updated batch_stats, gradients like params).
  """
  def loss_fn(params):
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch, config, True,
                               method=mixreorg.forward, rngs=rngs, mutable=["batch_stats"])
    return out["loss"], (out, updates["batch_stats"])

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, batch_stats, grads


def micro_batched_grads(params, batch_stats, batch: Dict[str, jax.Array], rngs: Dict[str, jax.Array], *,
                        model: groupvit.GroupViT, config: ml_collections.ConfigDict, shards: int
                        ) -> Tuple[jax.Array, Any, Any, Any]:
  """`one_shot_grads` of the same batch, with the towers run config.input.micro_batch_size examples at a time.

  Gradient caching (Gao et al. 2021): the losses are not sums over micro-batches (every contrastive logit matrix
  spans the whole batch), but they are functions of per-example tower outputs. So
    1. the towers run over each micro-batch, keeping only their outputs (`mixreorg.towers`: segment tokens,
       pooled text features, per-image group information, the mixed images' assignments; a few KB an example);
    2. the projectors (whose BatchNorm sees the whole batch) and every loss run on the whole batch
       (`mixreorg.heads`), differentiated with respect to their parameters and to the tower outputs;
    3. each micro-batch runs through the towers again and pulls its rows of the cached output gradient back to the
       parameters (jax.vjp); the sum over micro-batches plus step 2's is the gradient of the whole batch.
  Memory is that of one micro-batch's towers; the cost is one extra tower forward. Every random draw is the one
  the one-shot step makes for the same examples (micro_batch.draw), so the step is the same, not an
  approximation. The micro-batches are a lax.scan inside the step. shards: the devices the batch axis is split
  over (micro_batch.Layout). -> (loss, metrics, updated batch_stats, gradients like params).
  """
  size = config.input.micro_batch_size
  layout = micro_batch.Layout(batch["image"].shape[0] // size, size, shards)
  indices = jnp.arange(layout.count)

  def run_towers(params, index):
    micro = jax.tree.map(lambda x: micro_batch.rows_of(x, index, layout), batch)
    with micro_batch.drawing_rows_of(layout, index):
      return model.apply({"params": params}, micro, config, True, method=mixreorg.towers, rngs=rngs)

  # 1. Tower outputs of every micro-batch, without gradients: [n, b, ...] -> [B, ...] in the batch's order.
  _, stacked = jax.lax.scan(lambda carry, index: (carry, run_towers(params, index)), None, indices)
  features, labels = jax.tree.map(lambda x: micro_batch.join(x, layout), stacked)

  # 2. Projectors and losses on the whole batch.
  def heads_loss(params, features):
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, features, labels, config, True,
                               method=mixreorg.heads, mutable=["batch_stats"])
    return out["loss"], (out, updates["batch_stats"])

  (loss, (metrics, batch_stats)), (grads, feature_grads) = jax.value_and_grad(
      heads_loss, argnums=(0, 1), has_aux=True)(params, features)

  # 3. Each micro-batch again, its cached output gradient pulled back to the parameters.
  def pull_back(grads, index):
    _, tower_vjp, _ = jax.vjp(lambda p: run_towers(p, index), params, has_aux=True)
    (micro_grads,) = tower_vjp(jax.tree.map(lambda g: micro_batch.rows_of(g, index, layout), feature_grads))
    return jax.tree.map(jnp.add, grads, micro_grads), None

  grads, _ = jax.lax.scan(pull_back, grads, indices)
  return loss, metrics, batch_stats, grads


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, model: groupvit.GroupViT,
               tx: optax.GradientTransformation, schedule: Callable, config: ml_collections.ConfigDict,
               batch_shards: int = 1) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One update. Returns the new state and scalar metrics (all on device; nothing syncs with the host).

  With config.input.micro_batch_size the gradient is `micro_batched_grads` (batch_shards: the devices the batch
  is split over), else `one_shot_grads`; both are the gradient of the whole batch.
  """
  rngs = step_rngs(state.rng, state.step)
  if config.input.micro_batch_size:
    loss, metrics, batch_stats, grads = micro_batched_grads(state.params, state.batch_stats, batch, rngs,
                                                            model=model, config=config, shards=batch_shards)
  else:
    loss, metrics, batch_stats, grads = one_shot_grads(state.params, state.batch_stats, batch, rngs, model=model,
                                                       config=config)
  if config.debug_nan_step >= 0:  # Test hook for the NaN guard; absent from the compiled step otherwise.
    # Poisons config.debug_nan_steps (default 1) steps from step debug_nan_step on (halting needs a run of them).
    first = config.debug_nan_step
    poisoned = (state.step >= first) & (state.step < first + config.debug_nan_steps)
    grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN/inf anywhere makes the norm non-finite.

  def apply_update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params, decay = state.ema_params, ema_decay(config)
    if decay:
      ema_params = updated_ema(ema_params, params, ema_decay_at(decay, state.step))
    return params, batch_stats, opt_state, ema_params

  def skip_update(_):
    return state.params, state.batch_stats, state.opt_state, state.ema_params

  params, batch_stats, opt_state, ema_params = jax.lax.cond(finite, apply_update, skip_update, None)
  skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params,
      consecutive_skips=(state.consecutive_skips + 1) * skipped,
      skipped_steps=state.skipped_steps + skipped)
  metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step), skipped=skipped,
                 consecutive_skips=new_state.consecutive_skips)
  return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


def abstract_state(config, model, tx) -> TrainState:
  return jax.eval_shape(lambda: init_state(config, model, tx, jax.random.key(0)))


def sharded_abstract_state(abstract: TrainState, state_shardings) -> TrainState:
  """The state's shapes and dtypes laid out per `state_shardings` (a restore target, or to compile against)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)


def abstract_batch(config, mesh: Mesh) -> Dict[str, jax.ShapeDtypeStruct]:
  """The global input batch of config.input.batch_size as shapes, split over the mesh (to compile against)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((config.input.batch_size,) + x.shape[1:], x.dtype,
                                     sharding=sharding.batch_sharding(mesh)),
      example_batch(config, 1))


def jit_train_step(config, model, tx, schedule, mesh: Mesh, state_shardings) -> Callable:
  """The sharded step: state sharded per `state_shardings`, batch split over all devices, metrics replicated."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                           batch_shards=mesh.size)
  batch_spec = jax.tree.map(lambda _: sharding.batch_sharding(mesh), example_batch(config, 1))
  return jax.jit(step, in_shardings=(state_shardings, batch_spec),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_init_state(config, model, tx, state_shardings) -> Callable:
  """rng -> TrainState created directly in its sharded layout (no host copy of the parameters); None = default."""
  return jax.jit(functools.partial(init_state, config, model, tx), out_shardings=state_shardings)


def check_batch(config, mesh: Mesh) -> None:
  """Fails before compiling if the batch or the micro-batch does not split over devices or K does not divide
  the device batch or the device micro-batch."""
  per_device = sharding.per_device_batch(mesh, config.input.batch_size)
  if config.model.mixreorg:
    mixing.check_group_size(per_device, config.mix.group_size, what="per-device batch")
  micro = config.input.micro_batch_size
  if not micro:
    return
  if micro < 0 or config.input.batch_size % micro:
    raise ValueError(f"config.input.micro_batch_size={micro} must be 0 (off) or divide "
                     f"config.input.batch_size={config.input.batch_size}.")
  if micro % mesh.size:
    raise ValueError(f"config.input.micro_batch_size={micro} must be a multiple of the {mesh.size} devices of the "
                     "mesh: every micro-batch is split over all of them.")
  if config.model.mixreorg:
    mixing.check_group_size(micro // mesh.size, config.mix.group_size, what="per-device micro-batch")
