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
  """Two steps on a (data, fsdp) mesh from `state`. -> (metrics of step 1, its gradients (Adam's first moment
  after it, / (1 - b1)), the update of step 2 (parameters after it minus before))."""
  model, tx, schedule, _ = _setup(config)
  devices = jax.devices()[:data * fsdp]
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}), devices)
  shardings = sharding.state_shardings(mesh, state, min_size=64)  # small enough to really shard the tiny model
  step = train_step.jit_train_step(config, model, tx, schedule, mesh, shardings)
  state = jax.device_put(jax.tree.map(jnp.copy, state), shardings)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  after_one, metrics = step(state, batch)  # warm-up step 0 has learning rate 0: only the Adam moments move
  gradients = jax.tree.map(lambda m: m / (1 - config.optim.b1), jax.device_get(after_one.opt_state[1][0].mu))
  before = jax.device_get(after_one.params)
  after_two, _ = step(after_one, batch)  # learning rate base_lr / warmup_steps
  update = jax.tree.map(lambda a, b: a - b, jax.device_get(after_two.params), before)
  return jax.device_get(metrics), gradients, update


def _assert_same_steps(reference, runs, large_gradient_rtol=None):
  """The loss terms, gradients and update of each run equal those of `reference` on one device. -> its metrics.

  runs: {name: (config, data, fsdp)}, each stepped on a (data, fsdp) mesh from the same state and batch.
  large_gradient_rtol: also compare the gradients within this relative tolerance where they are over a tenth of
  the largest.
  """
  _, _, _, state = _setup(reference)
  batch = helpers.random_batch(reference)
  ref_metrics, ref_grads, ref_update = _two_steps_on_mesh(reference, 1, 1, state, batch)
  results = {name: _two_steps_on_mesh(config, data, fsdp, state, batch)
             for name, (config, data, fsdp) in runs.items()}
  assert np.isfinite(ref_metrics["loss"]) and ref_metrics["grad_norm"] > 0
  keys = [k for k in ("loss", "loss_orig", "loss_rest", "loss_seg", "loss_multi_label", "loss_noun_seg",
                      "loss_segment_nouns", "loss_segment_naming", "loss_prompt_uniformity", "grad_norm", "group_info",
                      "seg_acc") if k in ref_metrics]
  # Adam turns float noise on gradients that are 0 in theory (biases before a LayerNorm) into +-lr steps, so
  # updates are compared where the gradient is well above that noise. There they are about lr = 2e-3, 200x the
  # tolerance, so a missing, halved or sign-flipped update fails.
  well_determined = jax.tree.map(lambda g: np.abs(g) > 1e-3, ref_grads)
  compared = np.concatenate([np.abs(u[m]) for u, m in zip(jax.tree.leaves(ref_update),
                                                           jax.tree.leaves(well_determined))])
  assert compared.size > 1000 and np.median(compared) > 100 * 1e-5, (compared.size, np.median(compared))
  for name, (metrics, grads, update) in results.items():
    for key in keys:
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-5, err_msg=f"{key} on {name}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-4, err_msg=f"gradient on {name}"),
                 grads, ref_grads)
    jax.tree.map(lambda a, b, m: np.testing.assert_allclose(a[m], b[m], atol=1e-5, err_msg=f"update on {name}"),
                 update, ref_update, well_determined)
    if large_gradient_rtol:
      top = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
      large = jax.tree.map(lambda g: np.abs(g) > 0.1 * top, ref_grads)
      assert sum(int(m.sum()) for m in jax.tree.leaves(large)) > 100
      jax.tree.map(lambda a, b, m: np.testing.assert_allclose(a[m], b[m], rtol=large_gradient_rtol,
                                                              err_msg=f"large gradient on {name}"),
                   grads, ref_grads, large)
  return ref_metrics


def _assert_same_step_on_meshes(config, meshes=((8, 1), (4, 2))):
  """The loss terms, gradients and update on each (data, fsdp) mesh equal those on one device. -> metrics."""
  return _assert_same_steps(config, {mesh: (config, *mesh) for mesh in meshes})


MESH_CONFIG = {"optim.base_lr": 1e-2, "optim.base_batch_size": 16, "optim.warmup_steps": 5}


@pytest.mark.slow
def test_same_loss_gradients_and_update_on_one_device_data8_and_fsdp():
  _assert_same_step_on_meshes(helpers.tiny_config(**MESH_CONFIG))


@pytest.mark.slow
def test_multi_label_and_noun_segment_step_is_the_same_on_every_mesh():
  config = helpers.tiny_config(**MESH_CONFIG, **{"model.multi_label": True, "input.num_nouns": 3,
                                                  "loss.w_noun_seg": 1.0, "loss.w_segment_nouns": 1.0,
                                                  "loss.w_segment_naming": 1.0, "loss.seg_negatives": "batch",
                                                  "loss.seg_targets": "nouns", "loss.w_prompt_uniformity": 1.0,
                                                  "loss.w_source_nouns": 1.0})
  metrics = _assert_same_step_on_meshes(config, meshes=((4, 2),))
  assert metrics["loss_source_nouns"] > 0.1
  assert metrics["loss_multi_label"] > 0.5 * np.log(config.input.batch_size)
  assert metrics["loss_noun_seg"] > 0.1 and metrics["loss_segment_nouns"] > 0.1
  assert metrics["loss_segment_naming"] > 0.1
  assert -4.0 < metrics["loss_prompt_uniformity"] < -0.01  # in (-2t, 0): distinct prompts, neither equal nor opposite
  assert metrics["multi_label_logit_scale"] == pytest.approx(np.exp(config.model.logit_scale_init), rel=1e-5)


# Every loss term on, drop-path on (GroupViT's 0.1 at full depth), so that every random stream is exercised.
MICRO_CONFIG = {**MESH_CONFIG, "model.multi_label": True, "input.num_nouns": 3, "loss.w_noun_seg": 1.0,
                "loss.w_segment_nouns": 1.0, "loss.w_group_info": 0.5, "model.vision.drop_path_rate": 0.2,
                "input.batch_size": 32, "optim.base_batch_size": 32}


def _assert_micro_batched_step_is_the_one_shot_step(overrides, micro_batch_sizes):
  """micro_batch_sizes: {(data, fsdp): micro_batch_size}; each is compared with the one-shot step on one device."""
  reference = helpers.tiny_config(**MICRO_CONFIG, **overrides)
  runs = {f"micro-batch {size} on {mesh}": (helpers.tiny_config(**MICRO_CONFIG, **overrides,
                                                                **{"input.micro_batch_size": size}), *mesh)
          for mesh, size in micro_batch_sizes.items()}
  # Float32 sums in another order: the large gradients agree to ~2e-5 (one-shot meshes: tests above, 1e-3).
  return _assert_same_steps(reference, runs, large_gradient_rtol=5e-5)


@pytest.mark.slow
def test_micro_batched_mixreorg_step_is_the_one_shot_step_on_every_mesh():
  # On 8 devices a micro-batch of 16 has 2 examples (one mixing group) per device.
  metrics = _assert_micro_batched_step_is_the_one_shot_step({}, {(1, 1): 8, (8, 1): 16, (4, 2): 16})
  assert metrics["loss_multi_label"] > 0.5 * np.log(32) and metrics["loss_noun_seg"] > 0.1


@pytest.mark.slow
def test_micro_batched_groupvit_step_is_the_one_shot_step_on_every_mesh():
  _assert_micro_batched_step_is_the_one_shot_step({"model.mixreorg": False}, {(1, 1): 4, (8, 1): 8, (4, 2): 8})


@pytest.mark.parametrize("micro, mesh, message", [
    (12, (1, 1), "micro_batch_size=12 must be 0 .off. or divide config.input.batch_size=16"),
    (-4, (1, 1), "micro_batch_size=-4"),
    (4, (8, 1), "micro_batch_size=4 must be a multiple of the 8 devices"),
    (8, (8, 1), "config.mix.group_size=2 must divide the per-device micro-batch size 1"),
])
def test_bad_micro_batch_size_fails_before_compiling(micro, mesh, message):
  config = helpers.tiny_config(**{"input.micro_batch_size": micro})
  devices = jax.devices()[:mesh[0] * mesh[1]]
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": mesh[0], "fsdp": mesh[1]}), devices)
  with pytest.raises(ValueError, match=message):
    train_step.check_batch(config, mesh)


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


@pytest.mark.parametrize("joint", [True, False])
def test_captions_share_the_text_projectors_batch_statistics_with_the_noun_prompts_when_joint(joint):
  # The caption-image term reads the noun prompts only through the projector's BatchNorm statistics.
  config = helpers.tiny_config(**{"model.multi_label": True, "input.num_nouns": 3,
                                  "model.joint_text_projection": joint})
  _, _, _, state = _setup(config)
  batch = helpers.random_batch(config)
  other_nouns = dict(batch, nouns=helpers.random_batch(config, seed=1)["nouns"])
  rngs = train_step.step_rngs(state.rng, jnp.int32(0))
  caption_term = lambda b: float((lambda o: o["loss_orig"] - o["loss_multi_label"])(  # noqa: E731
      _forward(config, state.params, state.batch_stats, b, rngs)))
  moved = abs(caption_term(batch) - caption_term(other_nouns))
  assert (moved > 1e-4) if joint else (moved < 1e-6)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_without_rest_and_seg_weights_loss_equals_groupvit_baseline():
  # w_group_info = 0 in both: that term averages over every branch's assignments, so it differs between them.
  config = helpers.tiny_config(**{"loss.w_rest": 0.0, "loss.w_seg": 0.0, "loss.w_group_info": 0.0})
  baseline = helpers.tiny_config(**{"model.mixreorg": False, "loss.w_group_info": 0.0})
  _, _, _, state = _setup(config)
  batch = helpers.random_batch(config)
  rngs = train_step.step_rngs(state.rng, jnp.int32(3))
  ours = _forward(config, state.params, state.batch_stats, batch, rngs)
  theirs = _forward(baseline, state.params, state.batch_stats, batch, rngs)
  assert "loss_seg" in ours and "loss_seg" not in theirs
  np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5)  # batched 3B vs B matmuls: float32 rounding
  np.testing.assert_allclose(ours["loss"], ours["loss_orig"], rtol=1e-7)


def test_group_size_not_dividing_device_batch_fails_before_compiling():
  config = helpers.tiny_config(**{"mix.group_size": 3})
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 8, "fsdp": 1}))
  with pytest.raises(ValueError, match="config.mix.group_size=3"):
    train_step.check_batch(config, mesh)


def test_parameter_average_is_the_written_out_average_of_the_trained_parameters():
  """With optim.ema_decay=d the state's ema_params after steps 0..2 is e_t = a_t e_{t-1} + (1 - a_t) p_t from
  e_-1 = the initial parameters, a_t = min(d, (1 + t) / (10 + t)) (0.1, 0.18, then d = 0.2), in numpy from the
  parameters after each step; the trained parameters are those of the same steps without an average."""
  def three_steps(decay):
    config = helpers.tiny_config(**{"optim.ema_decay": decay, "optim.warmup_steps": 1, "optim.base_lr": 1e-2})
    model, tx, schedule, state = _setup(config)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1}), jax.devices()[:1])
    step = train_step.jit_train_step(config, model, tx, schedule, mesh, sharding.state_shardings(mesh, state))
    batch = helpers.random_batch(config)
    trajectory = [jax.device_get(state.params)]
    for _ in range(3):
      state, _ = step(state, batch)
      trajectory.append(jax.device_get(state.params))
    return trajectory, jax.device_get(state.ema_params)

  trajectory, ema = three_steps(0.2)
  plain, no_ema = three_steps(0.0)
  assert no_ema is None
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), trajectory[-1], plain[-1])
  expected = trajectory[0]
  for weight, params in zip((0.1, 2 / 11, 0.2), trajectory[1:]):
    expected = jax.tree.map(lambda e, p, w=weight: w * e + (1 - w) * p, expected, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ema, expected)
  # The average trails the last parameters by a fifth of the last update (lr 5e-3), so a missing or misweighted
  # average fails the tolerance above.
  gap = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(trajectory[-1])))
  assert gap > 1e-4


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


def _sharpened(params, factor=30.0):
  """params with the first grouping block's assignment queries scaled, so that assignments are more confident
  and the token-group information is larger than at initialisation."""
  def scale(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return leaf * factor if "stages_0/downsample/assign/q_proj/kernel" in name else leaf
  return jax.tree_util.tree_map_with_path(scale, params)


def test_group_information_weight_subtracts_the_logged_term_and_reaches_the_grouping_blocks():
  weight = 50.0  # the term is ~1e-2 here; the weight makes it far larger than the tolerance.
  plain = helpers.tiny_config(**{"loss.w_group_info": 0.0})
  weighted = helpers.tiny_config(**{"loss.w_group_info": weight})
  _, _, _, state = _setup(plain)
  params = _sharpened(state.params)
  batch = helpers.random_batch(plain)
  rngs = train_step.step_rngs(state.rng, jnp.int32(3))
  ours = _forward(weighted, params, state.batch_stats, batch, rngs)
  theirs = _forward(plain, params, state.batch_stats, batch, rngs)
  info = float(theirs["group_info"])
  assert 0.0 < info < np.log(plain.model.vision.num_output_groups[0])
  assert weight * info > 100 * 1e-5 * abs(float(theirs["loss"]))  # an ignored or added term fails
  np.testing.assert_allclose(ours["loss"], theirs["loss"] - weight * theirs["group_info"], rtol=1e-5)
  grads = jax.grad(lambda p: _forward(weighted, p, state.batch_stats, batch, rngs)["group_info"])(params)
  assign = grads["vision_model"]["stages_0"]["downsample"]["assign"]
  assert float(jnp.abs(assign["q_proj"]["kernel"]).sum()) > 0
  assert float(jnp.abs(assign["k_proj"]["kernel"]).sum()) > 0


def _seg_loss_reference(assignment, segment_emb, text_emb, src, scale, k, negatives):
  """L_seg written out with loops in numpy: the captions each mixed patch is contrasted with, and its logits.

  text_emb [B, D] (captions) or [B, M, D] (noun prompts: a segment's similarity to a source is its best noun's).
  """
  b, n, _ = assignment.shape
  similarity = lambda s, j: (max(s @ t for t in text_emb[j]) if text_emb.ndim == 3  # noqa: E731
                             else s @ text_emb[j])
  losses_, hits = [], []
  for i in range(b):
    first = i // k * k
    candidates = list(range(first, first + k)) if negatives == "group" else list(range(b))
    for p in range(n):
      logits = np.array([scale * sum(assignment[i, p, g] * similarity(segment_emb[i, g], j)
                                     for g in range(assignment.shape[2])) for j in candidates])
      target = candidates.index(first + src[i, p])
      log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
      losses_.append(-log_probs[target])
      hits.append(np.argmax(logits) == target)
  return np.mean(losses_), np.mean(hits)


@pytest.mark.parametrize("negatives,k,nouns", [("group", 2, 0), ("group", 3, 0), ("batch", 2, 0), ("batch", 3, 0),
                                               ("group", 2, 3), ("batch", 3, 3)])
def test_seg_loss_matches_a_written_out_computation(negatives, k, nouns):
  rng = np.random.default_rng(0)
  b, n, g, d = 6, 5, 4, 8
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  assignment = rng.dirichlet(np.ones(g), size=(b, n)).astype(np.float32)
  segment_emb = unit(rng.normal(size=(b, g, d))).astype(np.float32)
  text_emb = unit(rng.normal(size=(b, nouns, d) if nouns else (b, d))).astype(np.float32)
  src = rng.integers(0, k, (b, n)).astype(np.int32)
  loss, accuracy = losses.seg_loss(jnp.asarray(assignment), jnp.asarray(segment_emb), jnp.asarray(text_emb),
                                   jnp.asarray(src), jnp.float32(7.0), k, negatives)
  ref_loss, ref_accuracy = _seg_loss_reference(assignment, segment_emb, text_emb, src, 7.0, k, negatives)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(accuracy, ref_accuracy)
  assert ref_loss > 0.1  # not a degenerate case
  if nouns:  # the best noun, not the mean or the first one: the loss differs from those computations.
    for stand_in in (text_emb.mean(axis=1), text_emb[:, 0]):
      other, _ = _seg_loss_reference(assignment, segment_emb, stand_in, src, 7.0, k, negatives)
      assert abs(other - ref_loss) > 1e-2


def test_seg_loss_rejects_unknown_negatives():
  with pytest.raises(ValueError, match="config.loss.seg_negatives"):
    losses.seg_loss(jnp.ones((2, 1, 1)), jnp.ones((2, 1, 1)), jnp.ones((2, 1)), jnp.zeros((2, 1), jnp.int32),
                    1.0, 2, "everything")


def _segments_and_prompts(seed, b, g, m, d=6, length=4):
  """Random unit segment embeddings [b, g, d], prompt embeddings [b, m, d] and prompt tokens [b, m, length]."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  segments = unit(rng.normal(size=(b, g, d))).astype(np.float32)
  nouns = unit(rng.normal(size=(b, m, d))).astype(np.float32)
  return segments, nouns, rng.integers(0, 50, (b, m, length))


def test_noun_segment_loss_matches_a_written_out_computation():
  b, g, m = 5, 3, 2
  segments, nouns, tokens = _segments_and_prompts(1, b, g, m)
  tokens[3, 1] = tokens[0, 0]  # images 0 and 3 share a noun: a second positive for both prompts
  scale = 6.0
  losses_ = []
  for i in range(b):
    for k in range(m):
      logits = np.array([scale * max(segments[j, h] @ nouns[i, k] for h in range(g)) for j in range(b)])
      positives = [j for j in range(b) if any((tokens[j, q] == tokens[i, k]).all() for q in range(m))]
      assert i in positives and (len(positives) == 2) == ((i, k) in ((0, 0), (3, 1)))
      losses_.append(np.log(np.exp(logits).sum()) - np.log(np.exp(logits[positives]).sum()))
  ours = losses.noun_segment_loss(jnp.asarray(segments), jnp.asarray(nouns), jnp.asarray(tokens), jnp.float32(scale))
  np.testing.assert_allclose(ours, np.mean(losses_), rtol=1e-5)


def test_segment_noun_loss_matches_a_written_out_computation():
  b, g, m = 4, 3, 2
  segments, nouns, tokens = _segments_and_prompts(2, b, g, m)
  tokens[2, 0] = tokens[0, 1]  # one prompt twice: it must enter each image's normaliser once
  nouns[2, 0] = nouns[0, 1]
  scale = 5.0
  distinct = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (3, 0), (3, 1)]  # (2, 0) is a copy of (0, 1)
  losses_ = []
  for j in range(b):
    best = lambda i, k: scale * max(segments[j, h] @ nouns[i, k] for h in range(g))  # noqa: E731
    normaliser = np.log(sum(np.exp(best(i, k)) for i, k in distinct))
    losses_.extend(normaliser - best(j, k) for k in range(m))
  ours = losses.segment_noun_loss(jnp.asarray(segments), jnp.asarray(nouns), jnp.asarray(tokens), jnp.float32(scale))
  np.testing.assert_allclose(ours, np.mean(losses_), rtol=1e-5)


def test_segment_naming_loss_names_each_nouns_best_segment_over_the_distinct_prompts():
  b, g, m = 4, 3, 2
  segments, nouns, tokens = _segments_and_prompts(3, b, g, m)
  tokens[2, 0] = tokens[0, 1]  # one prompt twice: it must enter each normaliser once
  nouns[2, 0] = nouns[0, 1]
  scale = 5.0
  distinct = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (3, 0), (3, 1)]  # (2, 0) is a copy of (0, 1)
  losses_ = []
  for j in range(b):
    for k in range(m):
      segment = segments[j, max(range(g), key=lambda h: segments[j, h] @ nouns[j, k])]  # the noun's best segment
      normaliser = np.log(sum(np.exp(scale * segment @ nouns[i, q]) for i, q in distinct))
      losses_.append(normaliser - scale * segment @ nouns[j, k])
  args = jnp.asarray(segments), jnp.asarray(nouns), jnp.asarray(tokens), jnp.float32(scale)
  ours = losses.segment_naming_loss(*args)
  np.testing.assert_allclose(ours, np.mean(losses_), rtol=1e-5)
  # It differs from the segment-noun loss, which takes the best segment per *candidate* prompt.
  assert abs(float(ours) - float(losses.segment_noun_loss(*args))) > 0.05


def test_prompt_uniformity_matches_a_written_out_computation_over_pairs_of_different_prompts():
  b, m = 3, 2
  _, nouns, tokens = _segments_and_prompts(4, b, 1, m)
  tokens[2, 0] = tokens[0, 1]  # one prompt twice: the two copies are not a pair
  nouns[2, 0] = nouns[0, 1]
  rows = list(np.ndindex(b, m))
  different = lambda u, v: not (tokens[u] == tokens[v]).all()  # noqa: E731
  terms = [np.exp(-2.0 * np.sum((nouns[u] - nouns[v]) ** 2)) for u in rows for v in rows if different(u, v)]
  assert len(terms) == 6 * 5 - 2
  ours = losses.prompt_uniformity(jnp.asarray(nouns), jnp.asarray(tokens))
  np.testing.assert_allclose(ours, np.log(np.mean(terms)), rtol=1e-5)
  # Taking the copies for a pair (distance 0, exp 1) would raise it by far more than the tolerance.
  with_copies = terms + [1.0, 1.0]
  assert np.log(np.mean(with_copies)) - float(ours) > 0.05
  same = np.broadcast_to(tokens[:1, :1], tokens.shape)  # a single prompt: no pairs, 0.
  assert float(losses.prompt_uniformity(jnp.asarray(nouns), jnp.asarray(same))) == 0.0


def test_prompt_ids_are_equal_exactly_for_equal_token_rows():
  """Rows that share a prefix, differ only in their last token or repeat across images: one id per distinct row."""
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, 3, (6, 3, 4))  # few token values: many shared prefixes and repeated rows
  tokens[5, 2] = tokens[0, 0]
  tokens[4, 1] = tokens[0, 0] + np.array([0, 0, 0, 1])
  ids = np.asarray(jax.jit(losses.prompt_ids)(jnp.asarray(tokens)))
  flat = tokens.reshape(-1, 4)
  equal = (flat[:, None, :] == flat[None, :, :]).all(axis=-1)
  np.testing.assert_array_equal(ids[:, None] == ids[None, :], equal)
  assert ids.min() == 0 and ids.max() == len(np.unique(flat, axis=0)) - 1
  assert ids[0] != ids[13]  # prompts [0, 0] and [4, 1] differ in the last token only
  np.testing.assert_array_equal(losses.same_prompt(jnp.asarray(tokens)), equal)


def test_total_loss_adds_each_weighted_term_with_its_sign():
  terms = {"loss_orig": 1.0, "loss_rest": 2.0, "loss_seg": 3.0, "group_info": 5.0, "loss_noun_seg": 7.0,
           "loss_segment_nouns": 11.0, "loss_segment_naming": 13.0, "loss_prompt_uniformity": -17.0}
  weights = {"w_rest": 1.0, "w_seg": 0.5, "w_group_info": 0.1, "w_noun_seg": 2.0, "w_segment_nouns": 3.0,
             "w_segment_naming": 0.0, "w_prompt_uniformity": 0.25}
  expected = 1.0 + 2.0 + 1.5 - 0.5 + 14.0 + 33.0 + 0.0 - 4.25
  np.testing.assert_allclose(losses.total_loss(terms, weights), expected, rtol=1e-6)
  assert float(losses.total_loss({"loss_orig": 1.0}, weights)) == 1.0  # missing terms count as 0.


def _source_noun_loss_reference(assignment, segment_emb, noun_emb, noun_tokens, src, scale, k):
  """losses.source_noun_loss written out with loops in numpy."""
  b, n, g = assignment.shape
  m = noun_emb.shape[1]
  terms = []
  for i in range(b):
    first = i // k * k
    owner = {}
    for s in range(g):
      members = [p for p in range(n) if assignment[i, p, s] > 0.5]
      if members:
        owner[s] = np.bincount(src[i, members], minlength=k).argmax()
    if set(owner.values()) != set(range(k)):
      continue  # a source owns no segment of this mixed image
    for j in range(k):
      for mm in range(m):
        prompt = noun_emb[first + j, mm]
        logits = np.array([scale * max(segment_emb[i, s] @ prompt for s in owner if owner[s] == c)
                           for c in range(k)])
        positive = [c for c in range(k) if any((noun_tokens[first + c, q] == noun_tokens[first + j, mm]).all()
                                               for q in range(m))]
        lse = lambda x: x.max() + np.log(np.exp(x - x.max()).sum())  # noqa: E731
        terms.append(lse(logits) - lse(logits[positive]))
  return np.mean(terms)


@pytest.mark.parametrize("k", [2, 3])
def test_source_noun_loss_matches_a_written_out_computation(k):
  """Each source's nouns against the segments each source owns; a noun two sources share is positive for both; a
  mixed image in which a source owns no segment is left out."""
  b, n, g, m = 2 * k, 9, 4, 3
  segments, nouns, tokens = _segments_and_prompts(5, b, g, m)
  tokens[1, 2] = tokens[0, 0]  # source 1 of group 0 shares a prompt with source 0
  rng = np.random.default_rng(6)
  assignment = np.eye(g, dtype=np.float32)[rng.integers(0, g, (b, n))]  # hard [B, N, G]
  src = rng.integers(0, k, (b, n)).astype(np.int32)
  src[-1] = 0  # the last mixed image holds patches of source 0 only: no term
  args = (assignment, segments, nouns, tokens, src)
  loss = losses.source_noun_loss(*map(jnp.asarray, args), jnp.float32(5.0), k)
  ref = _source_noun_loss_reference(*args, 5.0, k)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert ref > 0.1
  separate = tokens.copy()
  separate[1, 2] = 49 - tokens[0, 0]  # no shared prompt: another loss
  assert abs(_source_noun_loss_reference(assignment, segments, nouns, separate, src, 5.0, k) - ref) > 1e-3
  grads = jax.grad(lambda s, scale: losses.source_noun_loss(jnp.asarray(assignment), s, jnp.asarray(nouns),
                                                            jnp.asarray(tokens), jnp.asarray(src), scale, k),
                   argnums=(0, 1))(jnp.asarray(segments), jnp.float32(5.0))
  assert float(jnp.abs(grads[0]).sum()) > 0 and np.isfinite(grads[1]) and grads[1] != 0
  np.testing.assert_array_equal(grads[0][-1], 0.0)  # the image left out gets no gradient
