"""Converted transformers GroupViT checkpoints reproduce transformers' outputs; converter errors name the tensor."""
import math
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mixreorg_jax import checkpoint_io  # noqa: E402
from mixreorg_jax import inference  # noqa: E402
from mixreorg_jax.tools import convert_groupvit  # noqa: E402
from tests import helpers  # noqa: E402

TOL = 1e-4

# Two small architectures: 3 stages with a token-free last stage vs 2 grouping stages, other image/patch sizes,
# activations, MLP ratios, and an end-of-text id in the middle of the vocabulary (pooling must not use max-id).
CONFIGS = {
    "three_stages_32px": dict(
        vision=dict(hidden_size=32, intermediate_size=64, depths=[2, 1, 1], num_hidden_layers=4,
                    num_group_tokens=[8, 4, 0], num_output_groups=[8, 4, 4], num_attention_heads=2,
                    image_size=32, patch_size=8),
        text=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=12, eos_token_id=99),
        projection_dim=16, projection_intermediate_dim=48),
    "two_stages_48px": dict(
        vision=dict(hidden_size=48, intermediate_size=96, depths=[1, 2], num_hidden_layers=3,
                    num_group_tokens=[8, 4], num_output_groups=[8, 4], num_attention_heads=3, image_size=48,
                    patch_size=16, hidden_act="quick_gelu", assign_mlp_ratio=[1.0, 2.0], assign_eps=0.5),
        text=dict(vocab_size=90, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
                  max_position_embeddings=10, eos_token_id=57, hidden_act="gelu"),
        projection_dim=8, projection_intermediate_dim=40),
}


def make_hf_model(name, seed=0):
  """A random transformers GroupViTModel in eval mode, with every parameter and BatchNorm statistic perturbed.

  name: a key of CONFIGS, or such a spec.
  """
  spec = CONFIGS[name] if isinstance(name, str) else name
  config = transformers.GroupViTConfig(
      text_config=dict(bos_token_id=1, pad_token_id=0, **spec["text"]), vision_config=spec["vision"],
      projection_dim=spec["projection_dim"], projection_intermediate_dim=spec["projection_intermediate_dim"])
  torch.manual_seed(seed)
  model = transformers.GroupViTModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():  # group tokens start at zero (all groups tie); noise makes every one count.
      p.add_(0.1 * torch.randn_like(p))
    for bn in (model.visual_projection[1], model.text_projection[1]):
      bn.running_mean.normal_(0.0, 0.5)
      bn.running_var.uniform_(0.5, 2.0)
    model.logit_scale.fill_(math.log(20.0))
  return model


def make_inputs(name, batch=3, seed=0):
  """NHWC float32 images and int32 tokens [bos, ..., eot, 0...] with eot at varying positions."""
  spec = CONFIGS[name] if isinstance(name, str) else name
  rng = np.random.default_rng(seed)
  size, length = spec["vision"]["image_size"], spec["text"]["max_position_embeddings"]
  eot = spec["text"]["eos_token_id"]
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  tokens = rng.integers(2, eot, (batch, length)).astype(np.int32)
  tokens[:, 0] = 1
  for i, pos in enumerate(rng.integers(2, length, batch)):
    tokens[i, pos], tokens[i, pos + 1:] = eot, 0
  return images, tokens


def run_converter(hf_dir, output):
  """The tool's main(), in-process, as `python -m ... --hf_dir=... --output=...` would run it."""
  run_converter_flags(hf_dir=str(hf_dir), output=str(output))


def run_converter_flags(**values):
  """The tool's main() with these flags, in-process."""
  helpers.run_tool_main(convert_groupvit, **values)


def hf_outputs(model, images, tokens):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), output_attentions=True)


def max_diff(ours, theirs):
  return float(np.abs(np.asarray(ours) - theirs.detach().numpy()).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_model_matches_transformers(name, tmp_path):
  hf = make_hf_model(name)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  run_converter(tmp_path / "hf", tmp_path / "ours")
  model = inference.load(str(tmp_path / "ours"))
  images, tokens = make_inputs(name)
  expected = hf_outputs(hf, images, tokens)

  image_emb, text_emb = model.encode_image(images), model.encode_text(tokens)
  logits = jax.jit(model.model.apply)(model.variables, images, tokens)[2]
  assert max_diff(image_emb, expected.image_embeds) <= TOL
  assert max_diff(text_emb, expected.text_embeds) <= TOL
  assert max_diff(logits, expected.logits_per_image) <= TOL
  # The perturbed BatchNorm statistics and logit scale were carried over.
  assert model.config.text.eot_id == CONFIGS[name]["text"]["eos_token_id"]
  np.testing.assert_allclose(np.exp(model.variables["params"]["logit_scale"]), 20.0, rtol=1e-6)
  assert model.tokenizer == {"kind": "clip_bpe", "path": "",
                             "context_length": CONFIGS[name]["text"]["max_position_embeddings"]}


def test_soft_grouping_matches_transformers(tmp_path):
  name = "three_stages_32px"
  hf = make_hf_model(name, seed=1)
  hf.save_pretrained(tmp_path / "hf")
  run_converter(tmp_path / "hf", tmp_path / "ours")
  model = inference.load(str(tmp_path / "ours"))
  images, tokens = make_inputs(name, seed=1)
  stages = hf_outputs(hf, images, tokens).vision_model_output.attentions  # per stage [B, S_out, N_in]
  expected = stages[0].transpose(1, 2)
  for attn in stages[1:]:
    expected = expected @ attn.transpose(1, 2)  # [B, N, G]
  groups = model.group_assignments(images)
  assert groups.shape == (3, 16, 4)
  assert max_diff(groups, expected) <= TOL
  np.testing.assert_allclose(np.asarray(groups).sum(-1), 1.0, atol=1e-5)
  segments, soft, grid = model.segment_embeddings(images)
  assert segments.shape == (3, 4, 16) and grid == (4, 4)
  np.testing.assert_array_equal(np.asarray(soft), np.asarray(groups))


def test_pytorch_bin_checkpoint_converts(tmp_path):
  name = "two_stages_48px"
  hf = make_hf_model(name, seed=2)
  hf.config.save_pretrained(tmp_path / "hf")
  torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
  run_converter(tmp_path / "hf", tmp_path / "ours")
  model = inference.load(str(tmp_path / "ours"))
  images, tokens = make_inputs(name, seed=2)
  assert max_diff(model.encode_image(images), hf_outputs(hf, images, tokens).image_embeds) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Converter errors
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_state():
  hf = make_hf_model("three_stages_32px")
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  return state, convert_groupvit.model_config_from_hf(hf.config.to_dict())


def test_missing_tensor_is_named(small_state):
  state, config = small_state
  name = "vision_model.encoder.stages.1.downsample.assign.k_proj.weight"
  broken = {k: v for k, v in state.items() if k != name}
  with pytest.raises(KeyError, match=re.escape(name)):
    convert_groupvit.convert_state_dict(broken, config)


def test_unexpected_tensor_is_named(small_state):
  state, config = small_state
  name = "vision_model.encoder.stages.2.group_token"
  with pytest.raises(KeyError, match=re.escape(name)):
    convert_groupvit.convert_state_dict({**state, name: np.zeros((1, 2, 32), np.float32)}, config)


def test_wrong_shape_is_named(small_state):
  state, config = small_state
  name = "text_model.encoder.layers.0.self_attn.v_proj.weight"
  with pytest.raises(ValueError, match=re.escape(name)):
    convert_groupvit.convert_state_dict({**state, name: np.zeros((32, 16), np.float32)}, config)


def test_ignored_buffers_and_full_mapping(small_state):
  state, config = small_state
  variables = convert_groupvit.convert_state_dict(
      {**state, "text_model.embeddings.position_ids": np.arange(12)[None]}, config)
  np.testing.assert_array_equal(variables["batch_stats"]["visual_projection"]["batchnorm"]["var"],
                                state["visual_projection.1.running_var"])
  # q, k, v are fused in that order along the output axis.
  qkv = variables["params"]["text_model"]["layers_0"]["self_attn"]["qkv_proj"]["kernel"]
  np.testing.assert_array_equal(qkv[:, 32:64], state["text_model.encoder.layers.0.self_attn.k_proj.weight"].T)


def test_missing_checkpoint_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint_io.load_inference_checkpoint(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    inference.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert_groupvit.read_hf_dir(str(tmp_path))
