"""Official NVlabs GroupViT checkpoints (.pth) convert and reproduce an independent GroupViT.

The reference is a random transformers GroupViTModel whose weights the test lays out under NVlabs' names. That
layout (`nvlabs_state_dict`) is written here from NVlabs/GroupViT's models/group_vit.py, models/transformer.py,
models/utils.py and models/multi_label_contrastive.py, independently of the converter's table.
"""
import re
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mixreorg_jax import inference  # noqa: E402
from mixreorg_jax.tools import convert_groupvit  # noqa: E402
from mixreorg_jax.tools import nvlabs  # noqa: E402
from tests import helpers  # noqa: E402
from tests import test_convert_parity as parity  # noqa: E402

TOL = 1e-4

# NVlabs' code fixes what these keep at its values: MLP ratio 4 (its cross-attention block hard-codes 4), token and
# channel ratios (0.5, 4), text heads = width / 64, QuickGELU text, exact-GELU image, eot = the largest id.
SPECS = {
    "three_stages_32px": dict(
        vision=dict(hidden_size=32, intermediate_size=128, depths=[2, 1, 1], num_hidden_layers=4,
                    num_group_tokens=[8, 4, 0], num_output_groups=[8, 4, 4], num_attention_heads=2,
                    image_size=32, patch_size=8),
        text=dict(vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                  num_attention_heads=1, max_position_embeddings=12, eos_token_id=99),
        projection_dim=16, projection_intermediate_dim=48),
    "one_grouping_stage_48px": dict(  # the 1-stage variant, as configs/demo.py
        vision=dict(hidden_size=48, intermediate_size=192, depths=[1, 2], num_hidden_layers=3,
                    num_group_tokens=[8, 0], num_output_groups=[8, 8], num_attention_heads=3, image_size=48,
                    patch_size=16),
        text=dict(vocab_size=90, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=10, eos_token_id=89),
        projection_dim=8, projection_intermediate_dim=40),
}

# transformers name -> NVlabs name, for the tensors that map one to one (the rest are fused below).
RENAMES = [
    (r"^vision_model\.embeddings\.patch_embeddings\.projection\.", "img_encoder.patch_embed.proj."),
    (r"^vision_model\.embeddings\.layernorm\.", "img_encoder.patch_embed.norm."),
    (r"^vision_model\.embeddings\.position_embeddings$", "img_encoder.pos_embed"),
    (r"^vision_model\.layernorm\.", "img_encoder.norm."),
    (r"^vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_norm1\.", r"img_encoder.layers.\1.blocks.\2.norm1."),
    (r"^vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_norm2\.", r"img_encoder.layers.\1.blocks.\2.norm2."),
    (r"^vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"img_encoder.layers.\1.blocks.\2.attn.proj."),
    (r"^vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.mlp\.", r"img_encoder.layers.\1.blocks.\2.mlp."),
    (r"^vision_model\.encoder\.stages\.(\d+)\.downsample\.pre_assign_attn\.attn\.out_proj\.",
     r"img_encoder.layers.\1.downsample.pre_assign_attn.attn.proj."),
    (r"^vision_model\.encoder\.stages\.(\d+)\.", r"img_encoder.layers.\1."),  # group_token, group_projector, downsample
    (r"^text_model\.embeddings\.token_embedding\.", "text_encoder.token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "text_encoder.positional_embedding"),
    (r"^text_model\.final_layer_norm\.", "text_encoder.ln_final."),
    (r"^text_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"text_encoder.transformer.resblocks.\1.ln_1."),
    (r"^text_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"text_encoder.transformer.resblocks.\1.ln_2."),
    (r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"text_encoder.transformer.resblocks.\1.attn.out_proj."),
    (r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"text_encoder.transformer.resblocks.\1.mlp.c_fc."),
    (r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"text_encoder.transformer.resblocks.\1.mlp.c_proj."),
    (r"^visual_projection\.0\.", "img_projector.linear_hidden.0."),
    (r"^visual_projection\.1\.", "img_projector.linear_hidden.1."),
    (r"^visual_projection\.3\.", "img_projector.linear_out."),
    (r"^text_projection\.0\.", "text_projector.linear_hidden.0."),
    (r"^text_projection\.1\.", "text_projector.linear_hidden.1."),
    (r"^text_projection\.3\.", "text_projector.linear_out."),
    (r"^logit_scale$", "logit_scale"),
]


def nvlabs_state_dict(hf_model, multi_label_scale=None):
  """A transformers GroupViTModel's weights under NVlabs' MultiLabelContrastive names and layouts."""
  hf = {k: v.detach().clone() for k, v in hf_model.state_dict().items() if not k.endswith("position_ids")}
  out = {}
  # AttnBlock.attn.qkv and nn.MultiheadAttention.in_proj pack q, k, v along the output axis.
  fused = [(r"^vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.self_attn\.", r"img_encoder.layers.\1.blocks.\2.attn.qkv.",
            ("weight", "bias")),
           (r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.", r"text_encoder.transformer.resblocks.\1.attn.in_proj_",
            ("weight", "bias"))]
  for pattern, target, kinds in fused:
    prefixes = sorted({m.group(0) for m in (re.match(pattern, k) for k in hf) if m})
    for prefix in prefixes:
      for kind in kinds:
        names = [f"{prefix}{x}_proj.{kind}" for x in "qkv"]
        out[re.sub(pattern, target, prefix) + kind] = torch.cat([hf.pop(n) for n in names], 0)
  for name, value in hf.items():
    for pattern, target in RENAMES:
      if re.match(pattern, name):
        new = re.sub(pattern, target, name)
        break
    else:
      raise AssertionError(f"no NVlabs name for {name}")
    if re.match(r"^(img|text)_projector\.linear_(hidden\.0|out)\.weight$", new):
      value = value[..., None]  # Conv1d, kernel 1: [out, in, 1].
    out[new] = value
  if multi_label_scale is not None:
    out["multi_label_logit_scale"] = torch.tensor(float(np.log(multi_label_scale)))
  return out


class _FakeContainer:
  """Stands for OmegaConf's containers and nodes when the checkpoint is written: pickled by reference to a module
  the reader cannot import, holding values under `_content` / `_val` as OmegaConf does."""


def omegaconf_like(value):
  """A nested dict/list/scalar as objects of the (absent) omegaconf module."""
  obj = _FakeContainer.__new__(_FakeContainer)
  if isinstance(value, dict):
    obj.__dict__.update(_metadata=None, _parent=None, _content={k: omegaconf_like(v) for k, v in value.items()})
  elif isinstance(value, list):
    obj.__dict__.update(_metadata=None, _parent=None, _content=[omegaconf_like(v) for v in value])
  else:
    obj.__dict__.update(_metadata=None, _parent=None, _val=value)
  return obj


def save_pth(path, state, config=None, monkeypatch=None):
  """torch.save as main_group_vit.py's save_checkpoint: {'model', 'optimizer', 'epoch', 'config', ...}."""
  checkpoint = {"model": state, "optimizer": {"state": {}}, "epoch": 29, "metrics": {"acc1": 0.5}}
  if config is not None:
    package, module = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.dictconfig")
    module.DictConfig, package.dictconfig = _FakeContainer, module
    _FakeContainer.__module__, _FakeContainer.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    monkeypatch.setitem(sys.modules, "omegaconf", package)
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", module)
    checkpoint["config"] = omegaconf_like(config)
  torch.save(checkpoint, path)
  if config is not None:  # the reader has no omegaconf.
    monkeypatch.delitem(sys.modules, "omegaconf.dictconfig")
    monkeypatch.delitem(sys.modules, "omegaconf")


def run_tool(**values):
  helpers.run_tool_main(convert_groupvit, **values)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_nvlabs_checkpoint_matches_independent_groupvit(name, tmp_path, monkeypatch):
  spec = SPECS[name]
  hf = parity.make_hf_model(spec, seed=3)
  heads = spec["vision"]["num_attention_heads"]
  pth = tmp_path / "checkpoint.pth"
  if name == "three_stages_32px":  # heads from the checkpoint's config entry (a pickled OmegaConf object).
    save_pth(pth, nvlabs_state_dict(hf), {"model": {"img_encoder": {"num_heads": [heads] * 3}}}, monkeypatch)
    run_tool(nvlabs_pth=str(pth), output=str(tmp_path / "ours"))
  else:  # no config entry: heads from the flag; multi-label scale present.
    save_pth(pth, nvlabs_state_dict(hf, multi_label_scale=30.0))
    run_tool(nvlabs_pth=str(pth), output=str(tmp_path / "ours"), vision_num_heads=heads)
  model = inference.load(str(tmp_path / "ours"))
  images, tokens = parity.make_inputs(spec, seed=3)
  expected = parity.hf_outputs(hf, images, tokens)
  image_diff = parity.max_diff(model.encode_image(images), expected.image_embeds)
  text_diff = parity.max_diff(model.encode_text(tokens), expected.text_embeds)
  print(f"{name}: max |image diff| {image_diff:.2e}, max |text diff| {text_diff:.2e}")
  assert image_diff <= TOL and text_diff <= TOL
  assert model.config.vision.num_heads == heads
  assert model.config.text.eot_id == spec["text"]["vocab_size"] - 1
  assert model.config.multi_label == (name != "three_stages_32px")
  if model.config.multi_label:
    np.testing.assert_allclose(np.exp(model.variables["params"]["multi_label_logit_scale"]), 30.0, rtol=1e-6)
  assert model.image_normalization == "imagenet"


def test_architecture_from_shapes():
  spec = SPECS["three_stages_32px"]
  state = {k: v.numpy() for k, v in nvlabs_state_dict(parity.make_hf_model(spec)).items()}
  m = nvlabs.model_config_from_state(state, nvlabs.Unknowns(vision_num_heads=2, hard_assignment=False))
  v, t = m.vision, m.text
  assert (v.width, v.patch_size, v.image_size, v.depths) == (32, 8, 32, (2, 1, 1))
  assert (v.num_group_tokens, v.num_output_groups, v.mlp_ratio) == ((8, 4, 0), (8, 4, 4), 4.0)
  assert (v.assign_mlp_ratio, v.hard_assignment, v.gumbel) == ((0.5, 4.0), False, False)
  assert (t.vocab_size, t.width, t.num_layers, t.num_heads, t.mlp_dim, t.context_length) == (100, 64, 1, 1, 256, 12)
  assert (m.projection_dim, m.projection_hidden_dim, m.multi_label) == (16, 48, False)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_nvlabs():
  state = {k: v.numpy() for k, v in nvlabs_state_dict(parity.make_hf_model(SPECS["three_stages_32px"])).items()}
  return state, nvlabs.model_config_from_state(state, nvlabs.Unknowns(vision_num_heads=2))


def test_missing_tensor_is_named(small_nvlabs):
  state, config = small_nvlabs
  name = "img_encoder.layers.1.downsample.assign.k_proj.weight"
  with pytest.raises(KeyError, match=re.escape(name)):
    nvlabs.convert_state_dict({k: v for k, v in state.items() if k != name}, config)


def test_unexpected_tensor_is_named(small_nvlabs):
  state, config = small_nvlabs
  name = "img_encoder.layers.0.downsample.reduction.1.weight"  # embed_factors != 1, which we do not build.
  with pytest.raises(KeyError, match=re.escape(name)):
    nvlabs.convert_state_dict({**state, name: np.zeros((32, 32), np.float32)}, config)


def test_wrong_shape_is_named(small_nvlabs):
  state, config = small_nvlabs
  name = "text_projector.linear_out.weight"
  with pytest.raises(ValueError, match=re.escape(name)):
    nvlabs.convert_state_dict({**state, name: np.zeros((16, 48, 3), np.float32)}, config)


def test_unshaped_text_width_and_mismatched_heads_are_errors(small_nvlabs):
  state, _ = small_nvlabs
  narrow = {**state, "text_encoder.token_embedding.weight": np.zeros((100, 48), np.float32)}
  with pytest.raises(ValueError, match="text_encoder.token_embedding.weight.*multiple of 64"):
    nvlabs.model_config_from_state(narrow, nvlabs.Unknowns())
  with pytest.raises(ValueError, match=re.escape("num_heads=[6, 6, 3]")):
    nvlabs.unknowns_from_config({"model": {"img_encoder": {"num_heads": [6, 6, 3]}}}, nvlabs.Unknowns())


def test_without_torch_the_error_says_so(tmp_path, monkeypatch):
  pth = tmp_path / "x.pth"
  pth.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError) as e:
    convert_groupvit.convert_nvlabs(str(pth), str(tmp_path / "out"))
  assert "needs torch" in str(e.value) and "pip install torch" in str(e.value) and "\n" not in str(e.value)


def test_not_an_nvlabs_checkpoint(tmp_path):
  torch.save({"state_dict": {}}, tmp_path / "other.pth")
  with pytest.raises(ValueError, match=r"\{'model': state_dict"):
    nvlabs.read_pth(str(tmp_path / "other.pth"))
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    convert_groupvit.convert_nvlabs(str(tmp_path / "nowhere.pth"), str(tmp_path / "out"))
