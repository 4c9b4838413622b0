"""Exported transformers GroupViT directories load with from_pretrained and give our embeddings."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import demo  # noqa: E402
from mixreorg_jax import checkpoint_io  # noqa: E402
from mixreorg_jax import inference  # noqa: E402
from mixreorg_jax.data import tokenizers  # noqa: E402
from mixreorg_jax.models import groupvit  # noqa: E402
from mixreorg_jax.tools import convert_groupvit  # noqa: E402
from mixreorg_jax.tools import export_hf  # noqa: E402
from tests import helpers  # noqa: E402
from tests import test_convert_parity as parity  # noqa: E402
from tests import test_tokenizers  # noqa: E402

TOL = 1e-4


def random_checkpoint(directory, model_config, tokenizer, seed=0, normalization="clip"):
  """An inference checkpoint of random variables (shapes from eval_shape of the init: nothing is compiled)."""
  model = groupvit.GroupViT.from_config(model_config)
  size, length = model_config.vision.image_size, model_config.text.context_length
  shapes = jax.eval_shape(model.init, jax.random.key(seed), jnp.zeros((1, size, size, 3)),
                          jnp.zeros((1, length), jnp.int32))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), shapes["params"])
  stats = jax.tree.map(lambda x: rng.uniform(0.2, 0.8, x.shape).astype(np.float32), shapes["batch_stats"])
  return checkpoint_io.save_inference_checkpoint(str(directory), {"params": params, "batch_stats": stats},
                                                 model_config, tokenizer, normalization)


def demo_model_config():
  c = demo.get_config()
  return c.model, checkpoint_io.tokenizer_info(c.input.tokenizer, c.input.tokenizer_path, c.input.context_length)


def compare(ours_dir, hf_dir, tokens, swapped=None):
  """-> (max |image diff|, max |text diff|) between inference.load and GroupViTModel.from_pretrained."""
  ours = inference.load(str(ours_dir))
  hf = transformers.GroupViTModel.from_pretrained(str(hf_dir)).eval()
  size = ours.config.vision.image_size
  images = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(export_hf.swap_ids(tokens, swapped).astype(np.int64)),
             pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return (parity.max_diff(ours.encode_image(images), out.image_embeds),
          parity.max_diff(ours.encode_text(tokens), out.text_embeds))


def test_demo_model_refuses_legacy_eos_then_exports_with_swapped_ids(tmp_path):
  model_config, tokenizer = demo_model_config()
  random_checkpoint(tmp_path / "ours", model_config, tokenizer)
  with pytest.raises(ValueError, match="eot_id=2.*legacy CLIP rule.*--swap_eot_id"):
    export_hf.export_hf(str(tmp_path / "ours"), str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()
  helpers.run_tool_main(export_hf, checkpoint=str(tmp_path / "ours"), output=str(tmp_path / "hf"), swap_eot_id=True)
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["text_config"]["eos_token_id"] == 511 and config["mixreorg_swapped_ids"] == [2, 511]
  assert config["vision_config"]["num_group_tokens"] == [8, 0]  # the demo's one grouping stage
  text = ["a red circle and a blue square", "a photo of a triangle."]
  tokens = tokenizers.checkpoint_tokenizer(tokenizer).tokenize_numpy(text)
  image_diff, text_diff = compare(tmp_path / "ours", tmp_path / "hf", tokens, tuple(config["mixreorg_swapped_ids"]))
  print(f"demo config: max |image diff| {image_diff:.2e}, max |text diff| {text_diff:.2e}")
  assert image_diff <= TOL and text_diff <= TOL


def test_clip_bpe_model_exports_with_its_tokenizer(tmp_path):
  vocab = test_tokenizers._small_vocab_file(tmp_path / "vocab.txt.gz")  # pylint: disable=protected-access
  model_config, _ = demo_model_config()
  v, t = model_config.vision, model_config.text
  v.width, v.num_heads, v.depths, v.num_group_tokens, v.num_output_groups = 32, 2, (1, 1, 1), (8, 4, 0), (8, 4, 4)
  v.image_size, v.patch_size, v.act = 32, 8, "quick_gelu"
  t.width, t.num_layers, t.num_heads, t.mlp_dim, t.context_length = 32, 1, 2, 64, 16
  tokenizer = checkpoint_io.tokenizer_info("clip_bpe", vocab, 16)
  ours_tokenizer = tokenizers.checkpoint_tokenizer(tokenizer)
  t.vocab_size, t.eot_id = ours_tokenizer.vocab_size, ours_tokenizer.eot_id
  random_checkpoint(tmp_path / "ours", model_config, tokenizer, seed=2, normalization="imagenet")
  export_hf.export_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))

  text = ["The quick brown fox!", "a photo of a lazy dog."]
  tokens = ours_tokenizer.tokenize_numpy(text)
  theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))(
      text, padding="max_length", max_length=16)["input_ids"]
  np.testing.assert_array_equal(np.asarray(theirs), tokens)
  image_diff, text_diff = compare(tmp_path / "ours", tmp_path / "hf", tokens)
  assert image_diff <= TOL and text_diff <= TOL
  processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
  assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["crop_size"]["height"] == 32


def test_hf_to_ours_to_hf_gives_the_same_tensors(tmp_path):
  hf = parity.make_hf_model("three_stages_32px", seed=4)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  convert_groupvit.convert(str(tmp_path / "hf"), str(tmp_path / "ours"))
  export_hf.export_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  _, original = convert_groupvit.read_hf_dir(str(tmp_path / "hf"))
  _, back = convert_groupvit.read_hf_dir(str(tmp_path / "back"))
  original = {k: v for k, v in original.items() if not k.endswith("position_ids")}
  back = {k: v for k, v in back.items() if not k.endswith("position_ids")}
  assert sorted(back) == sorted(original)
  for name, value in original.items():
    assert back[name].shape == value.shape and back[name].dtype == value.dtype, name
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  back_config = json.loads((tmp_path / "back" / "config.json").read_text())
  assert convert_groupvit.model_config_from_hf(back_config) == convert_groupvit.model_config_from_hf(
      hf.config.to_dict())


def test_soft_grouping_is_refused(tmp_path):
  model_config, tokenizer = demo_model_config()
  model_config.vision.hard_assignment = False
  random_checkpoint(tmp_path / "ours", model_config, tokenizer)
  with pytest.raises(ValueError, match=re.escape("hard_assignment=False")):
    export_hf.export_hf(str(tmp_path / "ours"), str(tmp_path / "hf"), swap_eot_id=True)
