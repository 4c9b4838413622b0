"""Unit tests of the GroupViT modules: straight-through assignment, Gumbel noise, shapes, resizing, dtypes, size."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import groupvit_gcc_yfcc
from mixreorg_jax.models import grouping
from mixreorg_jax.models import groupvit
from mixreorg_jax.models import layers
from mixreorg_jax.models import vision
from tests import helpers


def init_model(config, batch=2):
  model = groupvit.GroupViT.from_config(config.model)
  batch = helpers.random_batch(config, batch_size=batch)
  variables = jax.jit(model.init)(jax.random.key(0), batch["image"], batch["text"])
  return model, variables, batch


@functools.lru_cache
def _jitted_encode_image(model, train):
  return jax.jit(functools.partial(model.apply, method=groupvit.GroupViT.encode_image, train=train,
                                   mutable=["batch_stats"]))


def encode_image(model, variables, images, train=False, seed=0):
  """Jitted GroupViT.encode_image (eager flax is slow); train mode draws Gumbel noise from `seed`."""
  rngs = {"gumbel": jax.random.key(seed), "dropout": jax.random.key(seed)}
  return _jitted_encode_image(model, train)(variables, images, rngs=rngs)[0]


@pytest.fixture(scope="module")
def tiny():
  return init_model(helpers.tiny_config())


def assert_one_hot(x, axis=-1):
  x = np.asarray(x)
  np.testing.assert_allclose(x.sum(axis), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.minimum(np.abs(x), np.abs(x - 1.0)), 0.0, atol=1e-6)


def test_straight_through_gradient_is_the_soft_gradient():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  weights = jax.random.normal(jax.random.key(1), (2, 5, 7))

  def loss(x, hard):
    return (grouping.assignment_probs(x, axis=1, hard=hard, gumbel_rng=None) * weights).sum()

  assert_one_hot(grouping.assignment_probs(logits, axis=1, hard=True, gumbel_rng=None), axis=1)
  grad_hard, grad_soft = jax.grad(loss)(logits, True), jax.grad(loss)(logits, False)
  assert np.abs(np.asarray(grad_hard)).min() > 0.0  # reaches every logit, although the forward is one-hot.
  np.testing.assert_allclose(grad_hard, grad_soft, rtol=1e-5, atol=1e-7)


def test_gradient_flows_through_hard_assign_attention():
  attn = grouping.AssignAttention(hard=True, gumbel=True)
  q, k = jax.random.normal(jax.random.key(0), (2, 4, 8)), jax.random.normal(jax.random.key(1), (2, 10, 8))
  params = attn.init({"params": jax.random.key(2), "gumbel": jax.random.key(3)}, q, k, train=True)

  def loss(p):
    _, _, hard = attn.apply(p, q, k, train=True, rngs={"gumbel": jax.random.key(4)})
    return (hard * jnp.arange(hard.size).reshape(hard.shape)).sum()

  grads = jax.grad(loss)(params)["params"]
  # Only the assignment logits (q_proj, k_proj) feed `hard`; their gradient comes through the straight-through.
  assert float(jnp.abs(grads["q_proj"]["kernel"]).sum()) > 0.0
  assert float(jnp.abs(grads["k_proj"]["kernel"]).sum()) > 0.0


def test_gumbel_noise_is_a_function_of_the_rng():
  logits = jnp.zeros((1, 8, 64))
  draw = lambda seed: grouping.assignment_probs(  # noqa: E731
      logits, axis=1, hard=True, gumbel_rng=jax.random.key(seed))
  np.testing.assert_array_equal(draw(0), draw(0))
  assert not np.array_equal(np.argmax(draw(0), 1), np.argmax(draw(1), 1))


def test_model_gumbel_assignment_deterministic_given_rng(tiny):
  model, variables, batch = tiny

  def hard(seed):
    enc = encode_image(model, variables, batch["image"], train=True, seed=seed)
    return [np.asarray(a.hard) for a in enc.assignments]

  first, again, other = hard(0), hard(0), hard(1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(first, other))


@pytest.mark.parametrize("train", [False, True])
def test_hard_assignments_are_one_hot_over_groups(tiny, train):
  model, variables, batch = tiny
  enc = encode_image(model, variables, batch["image"], train=train, seed=1)
  for a in enc.assignments:
    assert_one_hot(a.hard, axis=-1)
    np.testing.assert_allclose(np.asarray(a.soft).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_output_shapes(tiny, batch_size):
  model, variables, _ = tiny
  config = helpers.tiny_config()
  batch = helpers.random_batch(config, batch_size=batch_size)
  image, text, logits = jax.jit(model.apply)(variables, batch["image"], batch["text"])
  d, b = config.model.projection_dim, batch_size
  assert image.embedding.shape == (b, d) and text.shape == (b, d) and logits.shape == (b, b)
  assert image.segment_embeddings.shape == (b, 4, d)
  assert [a.soft.shape for a in image.assignments] == [(b, 16, 8), (b, 8, 4)]
  assert [a.hard.shape for a in image.assignments] == [(b, 16, 8), (b, 8, 4)]
  assert tuple(int(g) for g in image.grid) == (4, 4)  # jit returns the static grid as arrays.
  np.testing.assert_allclose(np.linalg.norm(image.embedding, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("grid", [(6, 6), (3, 5), (4, 4)])
def test_position_embedding_resize_matches_torch_bicubic(grid):
  torch = pytest.importorskip("torch")
  pos = np.random.default_rng(0).normal(size=(1, 16, 5)).astype(np.float32)  # a 4 x 4 grid
  ours = vision.resize_position_embeddings(jnp.asarray(pos), grid)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(pos.reshape(1, 4, 4, 5)).permute(0, 3, 1, 2), size=grid, mode="bicubic",
      align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  np.testing.assert_allclose(layers.torch_bicubic_matrix(4, grid[0]).sum(1), 1.0, atol=1e-6)


def test_other_input_resolution_runs(tiny):
  model, variables, batch = tiny
  images = jnp.zeros((2, 48, 40, 3))  # 6 x 5 patches instead of the 4 x 4 of pretraining.
  enc = encode_image(model, variables, images)
  assert enc.assignments[0].soft.shape == (2, 30, 8)


def test_bfloat16_compute_keeps_float32_params():
  config = helpers.tiny_config(**{"model.dtype": "bfloat16"})
  model, variables, batch = init_model(config)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  (image, _, logits), inter = jax.jit(functools.partial(model.apply, capture_intermediates=True))(
      variables, batch["image"], batch["text"])
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(image.embedding)).all()
  qkv = inter["intermediates"]["vision_model"]["stages_0"]["layers_0"]["self_attn"]["qkv_proj"]["__call__"][0]
  assert qkv.dtype == jnp.bfloat16


def test_reference_parameter_count_matches_transformers():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = groupvit_gcc_yfcc.get_config()
  model = groupvit.GroupViT.from_config(config.model)
  size, length = config.model.vision.image_size, config.model.text.context_length
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  with torch.device("meta"):
    hf = transformers.GroupViTModel(transformers.GroupViTConfig())
  theirs = sum(p.numel() for p in hf.parameters())
  assert config.model.multi_label
  assert ours == theirs + 1, (ours, theirs)  # + our multi_label_logit_scale


def test_batchnorm_normalises_with_the_statistics_of_a_reference_in_training():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 8)) * 3.0 + 1.0
  ref = jax.random.normal(jax.random.PRNGKey(1), (4, 8)) * 0.5 - 2.0
  bn = groupvit.BatchNorm()
  variables = bn.init(jax.random.PRNGKey(2), ref, True)
  out, _ = bn.apply(variables, x, True, False, ref, mutable=["batch_stats"])
  expected = (x - ref.mean(0)) / jnp.sqrt(ref.var(0) + bn.epsilon)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # Without a reference it uses x's own statistics over every leading axis.
  own, _ = bn.apply(variables, x, True, False, mutable=["batch_stats"])
  np.testing.assert_allclose(own, (x - x.mean((0, 1))) / jnp.sqrt(x.var((0, 1)) + bn.epsilon), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention_matches_dot_product_attention(causal):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 7, 3, 8)) for i in range(3))
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  np.testing.assert_allclose(layers.multi_head_attention(q, k, v, causal), expected, atol=1e-5)
  grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))(q, k, v)  # noqa: E731
  for ours, theirs in zip(grad(lambda *a: layers.multi_head_attention(*a, causal)),
                          grad(lambda *a: jax.nn.dot_product_attention(*a, is_causal=causal))):
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_dense_matches_flax_dense_on_batched_inputs():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6))
  ours = layers.dense(4, jnp.float32)
  params = ours.init(jax.random.key(1), x)
  assert params["params"]["kernel"].shape == (6, 4)
  np.testing.assert_allclose(ours.apply(params, x), nn.Dense(4).apply(params, x), atol=1e-6)


def test_gelu_matches_exact_gelu_and_its_gradient():
  x = jnp.linspace(-8.0, 8.0, 4001)
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(x),
                             jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=1e-6)


def test_layer_norm_matches_flax_layer_norm_and_its_gradients():
  x = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, 16)) + 1.0
  ours, theirs = layers.layer_norm(), nn.LayerNorm(epsilon=layers.LAYER_NORM_EPS)
  params = theirs.init(jax.random.key(1), x)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
  for g_ours, g_theirs in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(params, x)),
                              jax.tree.leaves(jax.grad(loss(theirs), argnums=(0, 1))(params, x))):
    np.testing.assert_allclose(g_ours, g_theirs, atol=1e-4)


def test_softmax_matches_jax_softmax_and_its_gradient():
  logits = 4.0 * jax.random.normal(jax.random.key(0), (3, 4, 9))
  logits = logits.at[..., :3].set(jnp.finfo(jnp.float32).min)  # masked entries, as causal attention makes them
  np.testing.assert_allclose(layers.softmax_last_axis(logits), jax.nn.softmax(logits), atol=1e-6)
  weights = jax.random.normal(jax.random.key(1), logits.shape)
  grad = lambda f: jax.grad(lambda l: jnp.sum(weights * f(l)))(logits)  # noqa: E731
  np.testing.assert_allclose(grad(layers.softmax_last_axis), grad(jax.nn.softmax), atol=1e-6)
