"""The sharded train step: identical across meshes, gradients reach the right places, it learns."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mixreorg_jax import losses
from mixreorg_jax import mixreorg
from mixreorg_jax import optim
from mixreorg_jax import sharding
from mixreorg_jax import train_step
from mixreorg_jax.models import groupvit
from tests import helpers


def _setup(config):
  model = groupvit.GroupViT.from_config(config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.input.batch_size, config.total_steps)
  state = train_step.jit_init_state(config, model, tx, None)(jax.random.key(config.seed))  # default layout
  return model, tx, schedule, state


def _two_steps_on_mesh(config, data, fsdp, state, batch):
  model, tx, schedule, _ = _setup(config)
  devices = jax.devices()[:data * fsdp]
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}), devices)
  shardings = sharding.state_shardings(mesh, state, min_size=64)  # small enough to really shard the tiny model
  step = train_step.jit_train_step(config, model, tx, schedule, mesh, shardings)
  state = jax.device_put(jax.tree.map(jnp.copy, state), shardings)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  after_one, metrics = step(state, batch)  # learning rate 0: only the Adam moments (i.e. gradients) move
  first_moment = jax.device_get(after_one.opt_state[1][0].mu)
  after_two, _ = step(after_one, batch)
  return jax.device_get(metrics), first_moment, jax.device_get(after_two.params)


@pytest.mark.slow
def test_same_loss_gradients_and_update_on_one_device_data8_and_fsdp():
  # Adam turns gradient noise of ~1e-9 on near-zero gradients into +-lr steps, so the learning rate is kept at
  # 4e-6 for the parameter comparison; the gradients themselves (Adam's first moment) are compared directly,
  # with an absolute tolerance for gradients that are exactly 0 in theory (biases followed by a LayerNorm).
  config = helpers.tiny_config(**{"optim.base_lr": 2e-5, "optim.base_batch_size": 16})
  _, _, _, state = _setup(config)
  batch = helpers.random_batch(config)
  results = {mesh: _two_steps_on_mesh(config, *mesh, state, batch) for mesh in [(1, 1), (8, 1), (4, 2)]}
  ref_metrics, ref_moment, ref_params = results[(1, 1)]
  assert np.isfinite(ref_metrics["loss"]) and ref_metrics["grad_norm"] > 0
  for mesh, (metrics, moment, params) in results.items():
    for key in ("loss", "loss_orig", "loss_rest", "loss_seg", "grad_norm"):
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-5, err_msg=f"{key} on {mesh}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5, err_msg=f"gradient on {mesh}"),
                 moment, ref_moment)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"params on {mesh}"),
                 params, ref_params)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), ref_params, state.params))
  assert np.mean(moved) > 0.9, "the second step updates the parameters"


def _forward(config, params, batch_stats, batch, rngs):
  model = groupvit.GroupViT.from_config(config.model)
  out, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch, config, True,
                       method=mixreorg.forward, rngs=rngs, mutable=["batch_stats"])
  return out


def test_seg_loss_gradient_reaches_grouping_and_text_tower():
  config = helpers.tiny_config(**{"mix.context_layers": 0})
  _, _, _, state = _setup(config)
  batch = helpers.random_batch(config)
  rngs = train_step.step_rngs(state.rng, jnp.int32(0))
  grads = jax.grad(lambda p: _forward(config, p, state.batch_stats, batch, rngs)["loss_seg"])(state.params)
  norm = lambda tree: float(optax_norm(tree))  # noqa: E731
  vision = grads["vision_model"]
  assert norm(vision["stages_0"]["downsample"]["assign"]) > 0
  assert norm(vision["stages_0"]["downsample"]["mlp_inter"]) > 0
  assert norm(vision["stages_1"]["downsample"]) > 0
  assert norm(grads["text_model"]) > 0
  assert norm(grads["text_projection"]) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_without_rest_and_seg_weights_loss_equals_groupvit_baseline():
  config = helpers.tiny_config(**{"loss.w_rest": 0.0, "loss.w_seg": 0.0})
  baseline = helpers.tiny_config(**{"model.mixreorg": False})
  _, _, _, state = _setup(config)
  batch = helpers.random_batch(config)
  rngs = train_step.step_rngs(state.rng, jnp.int32(3))
  ours = _forward(config, state.params, state.batch_stats, batch, rngs)
  theirs = _forward(baseline, state.params, state.batch_stats, batch, rngs)
  assert "loss_seg" in ours and "loss_seg" not in theirs
  np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5)  # batched 3B vs B matmuls: float32 rounding


def test_group_size_not_dividing_device_batch_fails_before_compiling():
  config = helpers.tiny_config(**{"mix.group_size": 3})
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 8, "fsdp": 1}))
  with pytest.raises(ValueError, match="config.mix.group_size=3"):
    train_step.check_batch(config, mesh)


@pytest.mark.slow
def test_overfits_a_fixed_batch():
  config = helpers.tiny_config(**{"optim.base_lr": 3e-3, "optim.base_batch_size": 16})
  model, tx, schedule, state = _setup(config)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1}), jax.devices()[:1])
  step = train_step.jit_train_step(config, model, tx, schedule, mesh, sharding.state_shardings(mesh, state))
  batch = helpers.random_batch(config)
  history = []
  for _ in range(200):
    state, metrics = step(state, batch)
    history.append(metrics)
  first, last = jax.device_get(history[:10]), jax.device_get(history[-10:])
  mean = lambda ms, k: np.mean([m[k] for m in ms])  # noqa: E731
  for key in ("loss", "loss_orig", "loss_rest", "loss_seg"):
    assert mean(last, key) < 0.5 * mean(first, key), (key, mean(first, key), mean(last, key))
  assert mean(last, "seg_acc") > mean(first, "seg_acc") + 0.2


def test_group_information_is_log_groups_when_sure_and_spread_and_zero_when_collapsed():
  spread = jax.nn.one_hot(jnp.tile(jnp.arange(4), 3), 4)[None]  # [1, 12, 4]: every group used, one-hot
  collapsed = jax.nn.one_hot(jnp.zeros(12, jnp.int32), 4)[None]
  uniform = jnp.full((1, 12, 4), 0.25)
  np.testing.assert_allclose(losses.group_information(spread), np.log(4), rtol=1e-6)
  np.testing.assert_allclose(losses.group_information(collapsed), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.group_information(uniform), 0.0, atol=1e-6)
  # One token sure, one unsure of two groups: marginal (3/4, 1/4), mean conditional entropy log(2) / 2.
  half = jnp.array([[[1.0, 0.0], [0.5, 0.5]]])
  marginal_entropy = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  np.testing.assert_allclose(losses.group_information(half), marginal_entropy - 0.5 * np.log(2), rtol=1e-6)


def test_group_information_weight_subtracts_the_logged_term_and_reaches_the_grouping_blocks():
  plain = helpers.tiny_config(**{"loss.w_group_info": 0.0})
  weighted = helpers.tiny_config(**{"loss.w_group_info": 0.5})
  _, _, _, state = _setup(plain)
  batch = helpers.random_batch(plain)
  rngs = train_step.step_rngs(state.rng, jnp.int32(3))
  ours = _forward(weighted, state.params, state.batch_stats, batch, rngs)
  theirs = _forward(plain, state.params, state.batch_stats, batch, rngs)
  assert 0.0 < float(theirs["group_info"]) < np.log(plain.model.vision.num_output_groups[0])
  np.testing.assert_allclose(ours["loss"], theirs["loss"] - 0.5 * theirs["group_info"], rtol=1e-5)
  grads = jax.grad(lambda p: _forward(weighted, p, state.batch_stats, batch, rngs)["group_info"])(state.params)
  assign = grads["vision_model"]["stages_0"]["downsample"]["assign"]
  assert float(jnp.abs(assign["q_proj"]["kernel"]).sum()) > 0
  assert float(jnp.abs(assign["k_proj"]["kernel"]).sum()) > 0
