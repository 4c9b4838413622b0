"""Converts a GroupViT checkpoint, transformers' or NVlabs', into this project's inference checkpoint.

  python -m mixreorg_jax.tools.convert_groupvit --hf_dir=/path/to/groupvit-gcc-yfcc --output=/path/to/out
  python -m mixreorg_jax.tools.convert_groupvit --nvlabs_pth=group_vit_gcc_yfcc_30e.pth --output=/path/to/out \
      [--vision_num_heads=6] [--nohard_assignment]

`--hf_dir` holds `config.json` plus `model.safetensors` (read with `safetensors.numpy`, no torch needed) or
`pytorch_model.bin` (needs torch). `--nvlabs_pth` is an official NVlabs/GroupViT checkpoint (needs torch); its
architecture is read from the tensor shapes (tools/nvlabs.py), and what they cannot tell from the file's `config`
entry, else from --vision_num_heads and --hard_assignment, whose defaults are the released models'. The output
is written by `checkpoint_io.save_inference_checkpoint` and loads with `mixreorg_jax.inference.load(output)`.

Every tensor is mapped by an explicit table (`name_mapping` here for transformers, `nvlabs.name_mapping`): one
row per parameter of our model, naming the tensor(s) it comes from and how they are transformed. To load another
GroupViT-style checkpoint, read those tables and adapt one. A missing tensor, an unexpected tensor or a shape
mismatch is an error that names the tensor.
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import json
import os
from typing import Any, Dict, List, Mapping, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from safetensors import numpy as safetensors_numpy

from mixreorg_jax import checkpoint_io
from mixreorg_jax import optional_deps
from mixreorg_jax.models import reference
from mixreorg_jax.tools import nvlabs
from mixreorg_jax.tools import state_dicts as sd

Rule, Table = sd.Rule, sd.Table

# transformers' activation names -> ours (mixreorg_jax/models/layers.ACTIVATIONS).
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# Defaults of transformers' GroupViT{Vision,Text}Config, for config.json files that leave a key out.
HF_VISION_DEFAULTS = dict(hidden_size=384, intermediate_size=1536, depths=(6, 3, 3), num_group_tokens=(64, 8, 0),
                          num_output_groups=(64, 8, 8), num_attention_heads=6, image_size=224, patch_size=16,
                          num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5, assign_eps=1.0,
                          assign_mlp_ratio=(0.5, 4))
HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, eos_token_id=49407)
HF_DEFAULTS = dict(projection_dim=256, projection_intermediate_dim=4096, logit_scale_init_value=2.6592)


# ---------------------------------------------------------------------------------------------------------------
# Config: config.json -> config.model
# ---------------------------------------------------------------------------------------------------------------

def _square(value, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"config.json vision_config.{name}={value}: only square {name} is supported.")
    value = value[0]
  return int(value)


def _act(name: str, where: str) -> str:
  if name not in ACTIVATIONS:
    raise ValueError(f"config.json {where}.hidden_act={name!r}: expected one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def _ratio(numerator: int, denominator: int, where: str) -> float:
  ratio = numerator / denominator
  if int(denominator * ratio) != numerator:
    raise ValueError(f"config.json {where}: intermediate_size {numerator} is not width {denominator} times a "
                     "ratio that reproduces it exactly.")
  return ratio


def model_config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """transformers' GroupViTConfig (as a config.json dict) -> our config.model (keys of models/reference.py)."""
  vision = {**HF_VISION_DEFAULTS, **(hf_config.get("vision_config") or hf_config.get("vision_config_dict") or {})}
  text = {**HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or hf_config.get("text_config_dict") or {})}
  top = {**HF_DEFAULTS, **hf_config}
  for where, block in (("vision_config", vision), ("text_config", text)):
    if float(block["layer_norm_eps"]) != 1e-5:
      raise ValueError(f"config.json {where}.layer_norm_eps={block['layer_norm_eps']}: this model uses 1e-5.")
  if int(vision["num_channels"]) != 3:
    raise ValueError(f"config.json vision_config.num_channels={vision['num_channels']}: expected 3 (RGB).")

  m = reference.reference_model_config()
  m.mixreorg = False  # a converted GroupViT: the plain two-tower model.
  m.multi_label = False  # transformers' GroupViT has no multi-label logit scale.
  m.projection_dim = int(top["projection_dim"])
  m.projection_hidden_dim = int(top["projection_intermediate_dim"])
  m.logit_scale_init = float(top["logit_scale_init_value"])
  v = m.vision
  v.width = int(vision["hidden_size"])
  v.num_heads = int(vision["num_attention_heads"])
  v.depths = tuple(int(d) for d in vision["depths"])
  v.num_group_tokens = tuple(int(n) for n in vision["num_group_tokens"])
  v.num_output_groups = tuple(int(n) for n in vision["num_output_groups"])
  v.patch_size = _square(vision["patch_size"], "patch_size")
  v.image_size = _square(vision["image_size"], "image_size")
  v.mlp_ratio = _ratio(int(vision["intermediate_size"]), v.width, "vision_config")
  ratio = vision["assign_mlp_ratio"]
  v.assign_mlp_ratio = tuple(float(r) for r in (ratio if isinstance(ratio, (list, tuple)) else (ratio, ratio)))
  v.assign_eps = float(vision["assign_eps"])
  v.act = _act(vision["hidden_act"], "vision_config")
  t = m.text
  t.vocab_size = int(text["vocab_size"])
  t.width = int(text["hidden_size"])
  t.num_layers = int(text["num_hidden_layers"])
  t.num_heads = int(text["num_attention_heads"])
  t.mlp_dim = int(text["intermediate_size"])
  t.context_length = int(text["max_position_embeddings"])
  t.act = _act(text["hidden_act"], "text_config")
  eos = text["eos_token_id"]
  eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  if eos == 2:
    # transformers' legacy CLIP configs say eos_token_id=2 and pool at the largest id, which for the CLIP BPE
    # vocabulary is <|endoftext|> = vocab_size - 1.
    logging.warning("config.json text_config.eos_token_id=2 (legacy CLIP config): pooling at id %d, the "
                    "largest id, as transformers does.", t.vocab_size - 1)
    eos = t.vocab_size - 1
  t.eot_id = int(eos)
  return m


# ---------------------------------------------------------------------------------------------------------------
# Tensors: the name mapping
# ---------------------------------------------------------------------------------------------------------------

def _encoder_layer(ours: str, theirs: str) -> Table:
  return {
      **sd.layer_norm(f"{ours}/layer_norm1", f"{theirs}.layer_norm1"),
      **sd.fused_dense(f"{ours}/self_attn/qkv_proj", [f"{theirs}.self_attn.{x}_proj" for x in "qkv"]),
      **sd.dense(f"{ours}/self_attn/out_proj", f"{theirs}.self_attn.out_proj"),
      **sd.layer_norm(f"{ours}/layer_norm2", f"{theirs}.layer_norm2"),
      **sd.mlp(f"{ours}/mlp", f"{theirs}.mlp"),
  }


def _projector(ours: str, theirs: str) -> Table:
  """Our Projector <- nn.Sequential(Linear, BatchNorm1d, ReLU, Linear): indices 0, 1 and 3."""
  return {
      **sd.dense(f"params/{ours}/linear_0", f"{theirs}.0"),
      f"params/{ours}/batchnorm/scale": Rule((f"{theirs}.1.weight",)),
      f"params/{ours}/batchnorm/bias": Rule((f"{theirs}.1.bias",)),
      f"batch_stats/{ours}/batchnorm/mean": Rule((f"{theirs}.1.running_mean",)),
      f"batch_stats/{ours}/batchnorm/var": Rule((f"{theirs}.1.running_var",)),
      **sd.dense(f"params/{ours}/linear_1", f"{theirs}.3"),
  }


def name_mapping(model_config: ml_collections.ConfigDict) -> Table:
  """The full table, our parameter path -> Rule over transformers' GroupViTModel state-dict names."""
  v, t = model_config.vision, model_config.text
  table: Table = {
      "params/vision_model/embeddings/projection/kernel": Rule(
          ("vision_model.embeddings.patch_embeddings.projection.weight",), sd.conv_kernel),
      "params/vision_model/embeddings/projection/bias": Rule(
          ("vision_model.embeddings.patch_embeddings.projection.bias",)),
      **sd.layer_norm("params/vision_model/embeddings/layernorm", "vision_model.embeddings.layernorm"),
      "params/vision_model/embeddings/position_embeddings": Rule(("vision_model.embeddings.position_embeddings",)),
      **sd.layer_norm("params/vision_model/layernorm", "vision_model.layernorm"),
  }
  table.update(sd.vision_stages(v, _encoder_layer, "vision_model.encoder.stages.{i}", "layers", "out_proj"))
  table.update({
      "params/text_model/token_embedding/embedding": Rule(("text_model.embeddings.token_embedding.weight",)),
      "params/text_model/position_embedding/embedding": Rule(("text_model.embeddings.position_embedding.weight",)),
      **sd.layer_norm("params/text_model/final_layer_norm", "text_model.final_layer_norm"),
  })
  for i in range(t.num_layers):
    table.update(_encoder_layer(f"params/text_model/layers_{i}", f"text_model.encoder.layers.{i}"))
  table.update(_projector("visual_projection", "visual_projection"))
  table.update(_projector("text_projection", "text_projection"))
  table["params/logit_scale"] = Rule(("logit_scale",))
  return table


# ---------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------

def convert_state_dict(state: Mapping[str, np.ndarray],
                       model_config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """transformers GroupViTModel state dict (numpy) -> our variables {"params", "batch_stats"} (float32 numpy)."""
  return sd.apply_table(state, name_mapping(model_config), sd.target_shapes(model_config), "config.json")


def read_hf_dir(hf_dir: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """-> (config.json dict, state dict of numpy arrays) from model.safetensors or pytorch_model.bin."""
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found: --hf_dir must be a transformers GroupViT directory.")
  with open(config_path) as f:
    hf_config = json.load(f)
  safetensors_path = os.path.join(hf_dir, "model.safetensors")
  bin_path = os.path.join(hf_dir, "pytorch_model.bin")
  if os.path.isfile(safetensors_path):
    return hf_config, dict(safetensors_numpy.load_file(safetensors_path))
  if os.path.isfile(bin_path):
    torch = optional_deps.require("torch", f"Reading {bin_path} (or convert it to model.safetensors)")
    state = torch.load(bin_path, map_location="cpu", weights_only=True)
    return hf_config, {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                       for k, v in state.items()}
  raise FileNotFoundError(f"Neither model.safetensors nor pytorch_model.bin in {hf_dir}.")


def _save(variables: Dict[str, Any], model_config: ml_collections.ConfigDict, output: str, tokenizer_path: str,
          source: str, num_tensors: int) -> str:
  """Writes a converted GroupViT as an inference checkpoint (CLIP BPE tokenizer, ImageNet pixels) -> output dir."""
  tokenizer = checkpoint_io.tokenizer_info("clip_bpe", tokenizer_path, model_config.text.context_length)
  # GroupViT was trained (timm DeiT transform) and evaluated (mmseg img_norm_cfg) with ImageNet statistics.
  out = checkpoint_io.save_inference_checkpoint(output, variables, model_config, tokenizer,
                                                image_normalization="imagenet")
  n = sum(x.size for x in jax.tree.leaves(variables["params"]))
  logging.info("Converted %d tensors (%d parameters) from %s into %s.", num_tensors, n, source, out)
  return out


def convert(hf_dir: str, output: str, tokenizer_path: str = "") -> str:
  """Converts the transformers GroupViT in `hf_dir` into an inference checkpoint at `output`. -> output dir."""
  hf_config, state = read_hf_dir(hf_dir)
  model_config = model_config_from_hf(hf_config)
  return _save(convert_state_dict(state, model_config), model_config, output, tokenizer_path, hf_dir, len(state))


def convert_nvlabs(pth: str, output: str, tokenizer_path: str = "",
                   default: nvlabs.Unknowns = nvlabs.Unknowns()) -> str:
  """Converts an NVlabs GroupViT .pth into an inference checkpoint at `output`. -> output dir.

  default: what the shapes do not tell, used where the file has no `config` entry.
  """
  if not os.path.isfile(pth):
    raise FileNotFoundError(f"--nvlabs_pth={pth!r} does not exist.")
  state, saved_config = nvlabs.read_pth(pth)
  unknowns = nvlabs.unknowns_from_config(saved_config, default)
  logging.info("%s from %s: %s", "Read from the config entry" if saved_config else "No config entry; using",
               pth, unknowns)
  model_config = nvlabs.model_config_from_state(state, unknowns)
  return _save(nvlabs.convert_state_dict(state, model_config), model_config, output, tokenizer_path, pth,
               len(state))


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string("hf_dir", None, "transformers GroupViT directory (config.json + model.safetensors).")
  flags.DEFINE_string("nvlabs_pth", None, "An official NVlabs/GroupViT checkpoint ({'model': state_dict, ...}).")
  flags.DEFINE_string("output", None, "Output directory of the inference checkpoint (must not exist yet).")
  flags.DEFINE_string("tokenizer_path", "", "CLIP BPE vocab to record with the checkpoint ('' = the cached one).")
  flags.DEFINE_integer("vision_num_heads", nvlabs.RELEASED_VISION_HEADS,
                       "--nvlabs_pth without a config entry: heads of the image tower (the released models': 6).")
  flags.DEFINE_bool("hard_assignment", nvlabs.RELEASED_HARD_ASSIGNMENT,
                    "--nvlabs_pth without a config entry: hard (argmax) grouping assignment, as released.")


def main(argv: List[str]) -> None:
  console.to_log_file(console.tool_log_path("convert_groupvit"))
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if bool(FLAGS.hf_dir) == bool(FLAGS.nvlabs_pth) or not FLAGS.output:
    raise app.UsageError("Give --output and one of --hf_dir or --nvlabs_pth.")
  if FLAGS.hf_dir:
    print(convert(FLAGS.hf_dir, FLAGS.output, FLAGS.tokenizer_path))
  else:
    default = nvlabs.Unknowns(FLAGS.vision_num_heads, FLAGS.hard_assignment)
    print(convert_nvlabs(FLAGS.nvlabs_pth, FLAGS.output, FLAGS.tokenizer_path, default))


if __name__ == "__main__":
  define_flags()
  app.run(main)
