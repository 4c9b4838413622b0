"""Converts a Hugging Face `transformers` GroupViT checkpoint into this project's inference checkpoint.

  python -m mixreorg_jax.tools.convert_groupvit --hf_dir=/path/to/groupvit-gcc-yfcc --output=/path/to/out

`--hf_dir` holds `config.json` plus `model.safetensors` (read with `safetensors.numpy`, no torch needed) or
`pytorch_model.bin` (needs torch). The output is written by `checkpoint_io.save_inference_checkpoint` and loads
with `mixreorg_jax.inference.load(output)`.

Every tensor is mapped by the explicit table of `name_mapping`: one row per parameter of our model, naming the
Hugging Face tensor(s) it comes from and how they are transformed. To load another GroupViT-style checkpoint,
read that table and adapt it. A missing tensor, an unexpected tensor or a shape mismatch is an error that names
the tensor.
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import json
import os
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from mixreorg_jax import checkpoint_io
from mixreorg_jax.models import groupvit

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

# Tensors of the Hugging Face state dict that carry no parameter of ours.
IGNORED_SUFFIXES = ("num_batches_tracked", "position_ids")


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
  """transformers' GroupViTConfig (as a config.json dict) -> our config.model (keys of configs/common.py)."""
  vision = {**HF_VISION_DEFAULTS, **(hf_config.get("vision_config") or hf_config.get("vision_config_dict") or {})}
  text = {**HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or hf_config.get("text_config_dict") or {})}
  top = {**HF_DEFAULTS, **hf_config}
  for where, block in (("vision_config", vision), ("text_config", text)):
    if float(block["layer_norm_eps"]) != 1e-5:
      raise ValueError(f"config.json {where}.layer_norm_eps={block['layer_norm_eps']}: this model uses 1e-5.")
  if int(vision["num_channels"]) != 3:
    raise ValueError(f"config.json vision_config.num_channels={vision['num_channels']}: expected 3 (RGB).")

  m = common.base_config().model
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

def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Dense kernel [in, out]."""
  return w.T


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight OIHW -> flax Conv kernel HWIO."""
  return w.transpose(2, 3, 1, 0)


def identity(w: np.ndarray) -> np.ndarray:
  return w


class Rule(NamedTuple):
  """One parameter of ours: concat(transform(hf[name]) for name in sources) along the last axis."""
  sources: Tuple[str, ...]
  transform: Callable[[np.ndarray], np.ndarray] = identity


Table = Dict[str, Rule]  # our path ("params/vision_model/...", "batch_stats/...") -> Rule.


def _dense(ours: str, theirs: str) -> Table:
  return {f"{ours}/kernel": Rule((f"{theirs}.weight",), linear_kernel), f"{ours}/bias": Rule((f"{theirs}.bias",))}


def _fused_dense(ours: str, theirs: Sequence[str]) -> Table:
  """Several torch Linears fused into one Dense along its output axis, in the order given (q, k, v)."""
  return {f"{ours}/kernel": Rule(tuple(f"{t}.weight" for t in theirs), linear_kernel),
          f"{ours}/bias": Rule(tuple(f"{t}.bias" for t in theirs))}


def _layer_norm(ours: str, theirs: str) -> Table:
  return {f"{ours}/scale": Rule((f"{theirs}.weight",)), f"{ours}/bias": Rule((f"{theirs}.bias",))}


def _mlp(ours: str, theirs: str) -> Table:
  return {**_dense(f"{ours}/fc1", f"{theirs}.fc1"), **_dense(f"{ours}/fc2", f"{theirs}.fc2")}


def _encoder_layer(ours: str, theirs: str) -> Table:
  return {
      **_layer_norm(f"{ours}/layer_norm1", f"{theirs}.layer_norm1"),
      **_fused_dense(f"{ours}/self_attn/qkv_proj", [f"{theirs}.self_attn.{x}_proj" for x in "qkv"]),
      **_dense(f"{ours}/self_attn/out_proj", f"{theirs}.self_attn.out_proj"),
      **_layer_norm(f"{ours}/layer_norm2", f"{theirs}.layer_norm2"),
      **_mlp(f"{ours}/mlp", f"{theirs}.mlp"),
  }


def _grouping_block(ours: str, theirs: str) -> Table:
  """Our GroupingBlock <- transformers' GroupViTTokenAssign."""
  pre = f"{theirs}.pre_assign_attn"
  return {
      **_layer_norm(f"{ours}/norm_tokens", f"{theirs}.norm_tokens"),
      **_mlp(f"{ours}/mlp_inter/mlp", f"{theirs}.mlp_inter"),
      **_layer_norm(f"{ours}/norm_post_tokens", f"{theirs}.norm_post_tokens"),
      **_layer_norm(f"{ours}/norm_x", f"{theirs}.norm_x"),
      **_dense(f"{ours}/pre_assign_attn/attn/q_proj", f"{pre}.attn.q_proj"),
      **_fused_dense(f"{ours}/pre_assign_attn/attn/kv_proj", [f"{pre}.attn.k_proj", f"{pre}.attn.v_proj"]),
      **_dense(f"{ours}/pre_assign_attn/attn/out_proj", f"{pre}.attn.out_proj"),
      **_layer_norm(f"{ours}/pre_assign_attn/norm2", f"{pre}.norm2"),
      **_mlp(f"{ours}/pre_assign_attn/mlp", f"{pre}.mlp"),
      **_layer_norm(f"{ours}/pre_assign_attn/norm_post", f"{pre}.norm_post"),
      **{k: r for x in ("q_proj", "k_proj", "v_proj", "proj")
         for k, r in _dense(f"{ours}/assign/{x}", f"{theirs}.assign.{x}").items()},
      **_layer_norm(f"{ours}/norm_new_x", f"{theirs}.norm_new_x"),
      **_mlp(f"{ours}/mlp_channels", f"{theirs}.mlp_channels"),
  }


def _projector(ours: str, theirs: str) -> Table:
  """Our Projector <- nn.Sequential(Linear, BatchNorm1d, ReLU, Linear): indices 0, 1 and 3."""
  return {
      **_dense(f"params/{ours}/linear_0", f"{theirs}.0"),
      f"params/{ours}/batchnorm/scale": Rule((f"{theirs}.1.weight",)),
      f"params/{ours}/batchnorm/bias": Rule((f"{theirs}.1.bias",)),
      f"batch_stats/{ours}/batchnorm/mean": Rule((f"{theirs}.1.running_mean",)),
      f"batch_stats/{ours}/batchnorm/var": Rule((f"{theirs}.1.running_var",)),
      **_dense(f"params/{ours}/linear_1", f"{theirs}.3"),
  }


def name_mapping(model_config: ml_collections.ConfigDict) -> Table:
  """The full table, our parameter path -> Rule over transformers' GroupViTModel state-dict names."""
  v, t = model_config.vision, model_config.text
  table: Table = {
      "params/vision_model/embeddings/projection/kernel": Rule(
          ("vision_model.embeddings.patch_embeddings.projection.weight",), conv_kernel),
      "params/vision_model/embeddings/projection/bias": Rule(
          ("vision_model.embeddings.patch_embeddings.projection.bias",)),
      **_layer_norm("params/vision_model/embeddings/layernorm", "vision_model.embeddings.layernorm"),
      "params/vision_model/embeddings/position_embeddings": Rule(("vision_model.embeddings.position_embeddings",)),
      **_layer_norm("params/vision_model/layernorm", "vision_model.layernorm"),
  }
  for i, depth in enumerate(v.depths):
    ours, theirs = f"params/vision_model/stages_{i}", f"vision_model.encoder.stages.{i}"
    for j in range(depth):
      table.update(_encoder_layer(f"{ours}/layers_{j}", f"{theirs}.layers.{j}"))
    if v.num_group_tokens[i]:
      table[f"{ours}/group_token"] = Rule((f"{theirs}.group_token",))
      table.update(_grouping_block(f"{ours}/downsample", f"{theirs}.downsample"))
      if i > 0:  # transformers: group_projector = Sequential(LayerNorm, MixerMLP).
        table.update(_layer_norm(f"{ours}/group_projector_norm", f"{theirs}.group_projector.0"))
        table.update(_mlp(f"{ours}/group_projector/mlp", f"{theirs}.group_projector.1"))
  table.update({
      "params/text_model/token_embedding/embedding": Rule(("text_model.embeddings.token_embedding.weight",)),
      "params/text_model/position_embedding/embedding": Rule(("text_model.embeddings.position_embedding.weight",)),
      **_layer_norm("params/text_model/final_layer_norm", "text_model.final_layer_norm"),
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

def _flatten(tree) -> Dict[str, Any]:
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


def target_shapes(model_config: ml_collections.ConfigDict) -> Dict[str, Tuple[int, ...]]:
  """Our variable paths and shapes, from jax.eval_shape of the model's init (nothing is computed)."""
  model = groupvit.GroupViT.from_config(model_config)
  size, length = model_config.vision.image_size, model_config.text.context_length
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32), jnp.zeros((1, length), jnp.int32)))
  return {k: tuple(x.shape) for k, x in _flatten(variables).items()}


def convert_state_dict(state: Mapping[str, np.ndarray],
                       model_config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """transformers GroupViTModel state dict (numpy) -> our variables {"params", "batch_stats"} (float32 numpy)."""
  shapes = target_shapes(model_config)
  table = name_mapping(model_config)
  if set(table) != set(shapes):  # the table itself is out of date with the model.
    raise AssertionError(f"name_mapping does not cover the model: not mapped {sorted(set(shapes) - set(table))}, "
                         f"not in the model {sorted(set(table) - set(shapes))}.")
  used = {name for rule in table.values() for name in rule.sources}
  missing = sorted(used - set(state))
  if missing:
    raise KeyError(f"Tensor(s) missing from the checkpoint: {missing}.")
  unexpected = sorted(k for k in state if k not in used and not k.endswith(IGNORED_SUFFIXES))
  if unexpected:
    raise KeyError(f"Unexpected tensor(s) in the checkpoint (not in config.json's architecture): {unexpected}.")
  flat = {}
  for path, rule in table.items():
    # A fused parameter splits evenly along its last axis, one part per source tensor.
    fused = len(rule.sources) > 1
    part_shape = shapes[path][:-1] + (shapes[path][-1] // len(rule.sources),) if fused else shapes[path]
    parts = []
    for name in rule.sources:
      part = rule.transform(np.asarray(state[name], np.float32))
      if part.shape != part_shape:
        raise ValueError(
            f"Tensor {name} has shape {tuple(np.shape(state[name]))}, which maps to {part.shape}, but {path} "
            f"expects {part_shape}{' per fused part' if fused else ''} (check config.json against the weights).")
      parts.append(part)
    flat[path] = np.concatenate(parts, axis=-1) if fused else parts[0]
  return _unflatten(flat)


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
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return hf_config, dict(load_file(safetensors_path))
  if os.path.isfile(bin_path):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{bin_path} needs torch to read; install torch or convert it to model.safetensors.") from e
    state = torch.load(bin_path, map_location="cpu", weights_only=True)
    return hf_config, {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                       for k, v in state.items()}
  raise FileNotFoundError(f"Neither model.safetensors nor pytorch_model.bin in {hf_dir}.")


def convert(hf_dir: str, output: str, tokenizer_path: str = "") -> str:
  """Converts the transformers GroupViT in `hf_dir` into an inference checkpoint at `output`. -> output dir."""
  hf_config, state = read_hf_dir(hf_dir)
  model_config = model_config_from_hf(hf_config)
  variables = convert_state_dict(state, model_config)
  tokenizer = checkpoint_io.tokenizer_info("clip_bpe", tokenizer_path, model_config.text.context_length)
  # GroupViT was trained (timm DeiT transform) and evaluated (mmseg img_norm_cfg) with ImageNet statistics.
  out = checkpoint_io.save_inference_checkpoint(output, variables, model_config, tokenizer,
                                                image_normalization="imagenet")
  n = sum(x.size for x in jax.tree.leaves(variables["params"]))
  logging.info("Converted %d tensors (%d parameters) from %s into %s.", len(state), n, hf_dir, out)
  return out


FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "transformers GroupViT directory (config.json + model.safetensors).")
flags.DEFINE_string("output", None, "Output directory of the inference checkpoint (must not exist yet).")
flags.DEFINE_string("tokenizer_path", "", "CLIP BPE vocab to record with the checkpoint ('' = the cached one).")


def main(argv: List[str]) -> None:
  console.to_log_file(console.tool_log_path("convert_groupvit"))
  del argv
  if not FLAGS.hf_dir or not FLAGS.output:
    raise app.UsageError("Both --hf_dir and --output are required.")
  print(convert(FLAGS.hf_dir, FLAGS.output, FLAGS.tokenizer_path))


if __name__ == "__main__":
  app.run(main)
