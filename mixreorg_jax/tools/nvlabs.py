"""The official NVlabs/GroupViT checkpoints (`.pth` files of its README and of its `main_group_vit.py`).

Such a file is a torch pickle of {'model': state_dict, 'config': ..., 'optimizer': ..., ...}. The state dict of
its `MultiLabelContrastive` model has (read from NVlabs/GroupViT `models/group_vit.py`, `models/transformer.py`,
`models/utils.py` and `models/multi_label_contrastive.py`):

  img_encoder.patch_embed.{proj,norm}, img_encoder.pos_embed [1, N, C], img_encoder.norm,
  img_encoder.layers.{i}.blocks.{j}.{norm1, attn.qkv (fused q, k, v), attn.proj, norm2, mlp.fc1, mlp.fc2},
  img_encoder.layers.{i}.group_token [1, S_i, C], img_encoder.layers.{i}.group_projector.{0 (LayerNorm), 1 (MixerMlp)},
  img_encoder.layers.{i}.downsample.* (GroupingBlock; only stages before the last have one),
  text_encoder.{token_embedding, positional_embedding [L, C], ln_final},
  text_encoder.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight / in_proj_bias (fused q, k, v), attn.out_proj,
      ln_2, mlp.c_fc, mlp.c_proj}  (CLIP's block: QuickGELU, width / 64 heads),
  {img,text}_projector.linear_hidden.{0 (Conv1d, kernel 1), 1 (BatchNorm1d)}, {img,text}_projector.linear_out,
  logit_scale, and multi_label_logit_scale when trained with the multi-label loss.

The architecture is read from these shapes. What they cannot tell (the image tower's heads, hard or soft
assignment) comes from the checkpoint's `config` entry when it has one, else from the released models' values.
The text tower pools at the argmax of the token ids, which for CLIP's BPE vocabulary is <|endoftext|> =
vocab_size - 1: that is our eot_id.
"""
import pickle
import re
import types
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import ml_collections
import numpy as np

from mixreorg_jax import optional_deps
from mixreorg_jax.models import reference
from mixreorg_jax.tools import state_dicts as sd

Rule, Table = sd.Rule, sd.Table

# NVlabs' configs/group_vit_gcc_yfcc_30e.yml and GroupViT.__init__ defaults.
RELEASED_VISION_HEADS = 6
RELEASED_HARD_ASSIGNMENT = True
TEXT_HEAD_DIM = 64  # models/transformer.py: heads = width // 64.


# ---------------------------------------------------------------------------------------------------------------
# Reading the .pth
# ---------------------------------------------------------------------------------------------------------------

class _Inert:
  """Stands in for any class of the pickle other than tensors (NVlabs' OmegaConf config); runs no code.

  Pickle may create it without calling __init__ (protocol 2's NEWOBJ), so every attribute has a class default.
  """
  args: tuple = ()
  state: Any = None

  def __init__(self, *args, **kwargs):
    del kwargs
    self.args = args

  def __setstate__(self, state):
    self.state = state

  def entries(self) -> Dict[Any, Any]:
    """What pickle's SETITEMS / APPENDS put into it (dict and list subclasses)."""
    return self.__dict__.setdefault("_entries", {})

  def __setitem__(self, key, value):
    self.entries()[key] = value

  def append(self, value):
    self.entries()[len(self.entries())] = value

  def extend(self, values):
    for v in values:
      self.append(v)


class _InertUnpickler(pickle.Unpickler):
  """Resolves torch's tensor rebuilders and OrderedDict; every other class becomes an `_Inert`."""

  def find_class(self, module, name):
    if (module == "torch._utils" and name.startswith("_rebuild_")) or (module, name) == ("collections",
                                                                                         "OrderedDict"):
      return super().find_class(module, name)
    return type(name, (_Inert,), {"__module__": module})


def plain(value: Any) -> Any:
  """The pickled config as dicts, lists and scalars. OmegaConf containers keep their items under `_content` and
  their leaves under `_val`; an `_Inert` without either becomes None."""
  if isinstance(value, _Inert):
    state = value.state if isinstance(value.state, dict) else {}
    if "_content" in state:
      return plain(state["_content"])
    if "_val" in state:
      return plain(state["_val"])
    return plain(value.entries()) if value.entries() else None
  if isinstance(value, Mapping):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  return value


def read_pth(path: str) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
  """-> (the 'model' state dict as numpy, the 'config' entry as plain dicts or None) of an NVlabs .pth file."""
  torch = optional_deps.require("torch", f"Reading {path}")
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:  # a pickled config object (OmegaConf): read it without running its classes.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False,
                            pickle_module=types.SimpleNamespace(Unpickler=_InertUnpickler, load=pickle.load,
                                                                __name__="pickle"))
  if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
    keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(f"{path}: expected an NVlabs GroupViT checkpoint {{'model': state_dict, ...}}; got {keys}.")
  state = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
           for k, v in checkpoint["model"].items()}
  config = plain(checkpoint.get("config"))
  return state, config if isinstance(config, dict) else None


# ---------------------------------------------------------------------------------------------------------------
# The architecture from the shapes
# ---------------------------------------------------------------------------------------------------------------

def _shape(state: Mapping[str, np.ndarray], name: str) -> Tuple[int, ...]:
  if name not in state:
    raise KeyError(f"Tensor(s) missing from the checkpoint: ['{name}'] (is it an NVlabs GroupViT state dict?).")
  return tuple(np.shape(state[name]))


def _indices(state: Mapping[str, np.ndarray], prefix: str) -> int:
  """How many consecutive `prefix{i}.` modules the state dict has (0, 1, ...)."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = {int(m.group(1)) for m in map(pattern.match, state) if m}
  count = len(found)
  if found != set(range(count)):
    raise KeyError(f"Tensors {prefix}{{i}}.* are not numbered 0..{count - 1}: found {sorted(found)}.")
  return count


class Unknowns(NamedTuple):
  """What the tensor shapes do not tell."""
  vision_num_heads: int = RELEASED_VISION_HEADS
  hard_assignment: bool = RELEASED_HARD_ASSIGNMENT


def unknowns_from_config(config: Optional[Mapping[str, Any]], default: Unknowns) -> Unknowns:
  """The checkpoint's config entry (model.img_encoder.num_heads, .hard_assignment) over `default`."""
  encoder = ((config or {}).get("model") or {}).get("img_encoder") or {}
  heads = encoder.get("num_heads", default.vision_num_heads)
  if isinstance(heads, (list, tuple)):
    if len(set(heads)) != 1:
      raise ValueError(f"The checkpoint's config has model.img_encoder.num_heads={list(heads)}; this model uses one "
                       "head count for every stage.")
    heads = heads[0]
  return Unknowns(int(heads), bool(encoder.get("hard_assignment", default.hard_assignment)))


def model_config_from_state(state: Mapping[str, np.ndarray], unknowns: Unknowns) -> ml_collections.ConfigDict:
  """NVlabs state dict (numpy) -> our config.model (keys of models/reference.py), read from the tensor shapes."""
  width, _, patch, _ = _shape(state, "img_encoder.patch_embed.proj.weight")
  num_patches = _shape(state, "img_encoder.pos_embed")[1]
  grid = int(round(num_patches ** 0.5))
  if grid * grid != num_patches:
    raise ValueError(f"Tensor img_encoder.pos_embed has {num_patches} positions, not a square patch grid.")
  num_stages = _indices(state, "img_encoder.layers.")
  depths, group_tokens, output_groups = [], [], []
  for i in range(num_stages):
    layer = f"img_encoder.layers.{i}"
    depths.append(_indices(state, f"{layer}.blocks."))
    group_tokens.append(_shape(state, f"{layer}.group_token")[1] if f"{layer}.group_token" in state else 0)
    # Stage i > 0 keeps the segments of the stage before when it has no grouping block (NVlabs: the last one).
    downsample = f"{layer}.downsample.mlp_inter.fc2.weight"
    output_groups.append(_shape(state, downsample)[0] if downsample in state else
                         (output_groups[-1] if output_groups else num_patches))
  text_vocab, text_width = _shape(state, "text_encoder.token_embedding.weight")
  if text_width % TEXT_HEAD_DIM:
    raise ValueError(f"Tensor text_encoder.token_embedding.weight has width {text_width}; NVlabs' text tower has "
                     f"width / {TEXT_HEAD_DIM} heads, so the width must be a multiple of {TEXT_HEAD_DIM}.")

  m = reference.reference_model_config()
  m.mixreorg = False  # a converted GroupViT: the plain two-tower model.
  m.multi_label = "multi_label_logit_scale" in state
  m.projection_hidden_dim, *_ = _shape(state, "img_projector.linear_hidden.0.weight")
  m.projection_dim, *_ = _shape(state, "img_projector.linear_out.weight")
  v = m.vision
  v.width, v.patch_size, v.image_size = width, patch, grid * patch
  v.num_heads = unknowns.vision_num_heads
  v.depths, v.num_group_tokens, v.num_output_groups = tuple(depths), tuple(group_tokens), tuple(output_groups)
  v.mlp_ratio = _shape(state, "img_encoder.layers.0.blocks.0.mlp.fc1.weight")[0] / width
  v.hard_assignment = v.gumbel = unknowns.hard_assignment  # NVlabs: gumbel=hard_assignment.
  v.assign_eps, v.act = 1.0, "gelu"  # GroupingBlock's default eps; timm's nn.GELU.
  first_grouping = next((i for i, n in enumerate(group_tokens) if n), None)
  if first_grouping is not None:
    block = f"img_encoder.layers.{first_grouping}.downsample"
    v.assign_mlp_ratio = (_shape(state, f"{block}.mlp_inter.fc1.weight")[0] / width,
                          _shape(state, f"{block}.mlp_channels.fc1.weight")[0] / width)
  t = m.text
  t.vocab_size, t.width = text_vocab, text_width
  t.num_layers = _indices(state, "text_encoder.transformer.resblocks.")
  t.num_heads = text_width // TEXT_HEAD_DIM
  t.mlp_dim = _shape(state, "text_encoder.transformer.resblocks.0.mlp.c_fc.weight")[0]
  t.context_length = _shape(state, "text_encoder.positional_embedding")[0]
  t.eot_id = text_vocab - 1  # pooled at the argmax of the ids: the largest id of the vocabulary.
  t.act = "quick_gelu"
  return m


# ---------------------------------------------------------------------------------------------------------------
# The name mapping
# ---------------------------------------------------------------------------------------------------------------

def _vision_block(ours: str, theirs: str) -> Table:
  return {
      **sd.layer_norm(f"{ours}/layer_norm1", f"{theirs}.norm1"),
      **sd.dense(f"{ours}/self_attn/qkv_proj", f"{theirs}.attn.qkv"),  # [3C, C]: q, k, v along the output.
      **sd.dense(f"{ours}/self_attn/out_proj", f"{theirs}.attn.proj"),
      **sd.layer_norm(f"{ours}/layer_norm2", f"{theirs}.norm2"),
      **sd.mlp(f"{ours}/mlp", f"{theirs}.mlp"),
  }


def _text_block(ours: str, theirs: str) -> Table:
  """Our EncoderLayer <- CLIP's ResidualAttentionBlock (nn.MultiheadAttention packs q, k, v in in_proj)."""
  return {
      **sd.layer_norm(f"{ours}/layer_norm1", f"{theirs}.ln_1"),
      f"{ours}/self_attn/qkv_proj/kernel": Rule((f"{theirs}.attn.in_proj_weight",), sd.linear_kernel),
      f"{ours}/self_attn/qkv_proj/bias": Rule((f"{theirs}.attn.in_proj_bias",)),
      **sd.dense(f"{ours}/self_attn/out_proj", f"{theirs}.attn.out_proj"),
      **sd.layer_norm(f"{ours}/layer_norm2", f"{theirs}.ln_2"),
      **sd.mlp(f"{ours}/mlp", f"{theirs}.mlp", fc1="c_fc", fc2="c_proj"),
  }


def _projector(ours: str, theirs: str) -> Table:
  """Our Projector <- ProjectMLP: linear_hidden = (Conv1d, BatchNorm1d, ReLU), linear_out = Conv1d."""
  hidden = f"{theirs}.linear_hidden"
  return {
      f"params/{ours}/linear_0/kernel": Rule((f"{hidden}.0.weight",), sd.conv1d_kernel),
      f"params/{ours}/linear_0/bias": Rule((f"{hidden}.0.bias",)),
      f"params/{ours}/batchnorm/scale": Rule((f"{hidden}.1.weight",)),
      f"params/{ours}/batchnorm/bias": Rule((f"{hidden}.1.bias",)),
      f"batch_stats/{ours}/batchnorm/mean": Rule((f"{hidden}.1.running_mean",)),
      f"batch_stats/{ours}/batchnorm/var": Rule((f"{hidden}.1.running_var",)),
      f"params/{ours}/linear_1/kernel": Rule((f"{theirs}.linear_out.weight",), sd.conv1d_kernel),
      f"params/{ours}/linear_1/bias": Rule((f"{theirs}.linear_out.bias",)),
  }


def name_mapping(model_config: ml_collections.ConfigDict) -> Table:
  """The full table, our variable path -> Rule over NVlabs' MultiLabelContrastive state-dict names."""
  v, t = model_config.vision, model_config.text
  table: Table = {
      "params/vision_model/embeddings/projection/kernel": Rule(("img_encoder.patch_embed.proj.weight",),
                                                               sd.conv_kernel),
      "params/vision_model/embeddings/projection/bias": Rule(("img_encoder.patch_embed.proj.bias",)),
      **sd.layer_norm("params/vision_model/embeddings/layernorm", "img_encoder.patch_embed.norm"),
      "params/vision_model/embeddings/position_embeddings": Rule(("img_encoder.pos_embed",)),
      **sd.layer_norm("params/vision_model/layernorm", "img_encoder.norm"),
  }
  table.update(sd.vision_stages(v, _vision_block, "img_encoder.layers.{i}", "blocks", "proj"))
  table.update({
      "params/text_model/token_embedding/embedding": Rule(("text_encoder.token_embedding.weight",)),
      "params/text_model/position_embedding/embedding": Rule(("text_encoder.positional_embedding",)),
      **sd.layer_norm("params/text_model/final_layer_norm", "text_encoder.ln_final"),
  })
  for i in range(t.num_layers):
    table.update(_text_block(f"params/text_model/layers_{i}", f"text_encoder.transformer.resblocks.{i}"))
  table.update(_projector("visual_projection", "img_projector"))
  table.update(_projector("text_projection", "text_projector"))
  table["params/logit_scale"] = Rule(("logit_scale",))
  if model_config.multi_label:
    table["params/multi_label_logit_scale"] = Rule(("multi_label_logit_scale",))
  return table


def convert_state_dict(state: Mapping[str, np.ndarray],
                       model_config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """NVlabs state dict (numpy) -> our variables {"params", "batch_stats"} (float32 numpy)."""
  return sd.apply_table(state, name_mapping(model_config), sd.target_shapes(model_config), "the tensor shapes")
