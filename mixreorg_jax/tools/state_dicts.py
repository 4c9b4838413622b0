"""Name mappings between PyTorch state dicts and this project's variables, in both directions.

A mapping is a `Table`: one row per variable of our model ("params/vision_model/...", "batch_stats/..."), naming
the torch tensor(s) it comes from and how each is transformed. `apply_table` reads a state dict with it (every
missing, unexpected or mis-shaped tensor is an error that names it); `invert_table` writes one. The tables
themselves live with their formats: transformers' in tools/convert_groupvit.py, NVlabs' in tools/nvlabs.py.
"""
from typing import Any, Callable, Dict, Mapping, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixreorg_jax.models import groupvit

# Tensors of a torch state dict that carry no parameter of ours.
IGNORED_SUFFIXES = ("num_batches_tracked", "position_ids")


def identity(w: np.ndarray) -> np.ndarray:
  return w


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] <-> Dense kernel [in, out] (its own inverse)."""
  return w.T


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight OIHW -> flax Conv kernel HWIO."""
  return w.transpose(2, 3, 1, 0)


def conv_weight(k: np.ndarray) -> np.ndarray:
  """flax Conv kernel HWIO -> torch Conv2d weight OIHW (inverse of conv_kernel)."""
  return k.transpose(3, 2, 0, 1)


def conv1d_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv1d weight [out, in, 1] (a Linear over channels, NVlabs' projectors) -> Dense kernel [in, out]."""
  return w.reshape(w.shape[0], -1).T  # another kernel size maps to a wrong shape, which apply_table reports.


def conv1d_weight(k: np.ndarray) -> np.ndarray:
  """Dense kernel [in, out] -> torch Conv1d weight [out, in, 1] (inverse of conv1d_kernel)."""
  return k.T[..., None]


INVERSE = {identity: identity, linear_kernel: linear_kernel, conv_kernel: conv_weight, conv1d_kernel: conv1d_weight}


class Rule(NamedTuple):
  """One variable of ours: concat(transform(torch[name]) for name in sources) along the last axis."""
  sources: Tuple[str, ...]
  transform: Callable[[np.ndarray], np.ndarray] = identity


Table = Dict[str, Rule]  # our path ("params/vision_model/...", "batch_stats/...") -> Rule.


def dense(ours: str, theirs: str) -> Table:
  return {f"{ours}/kernel": Rule((f"{theirs}.weight",), linear_kernel), f"{ours}/bias": Rule((f"{theirs}.bias",))}


def fused_dense(ours: str, theirs: Sequence[str]) -> Table:
  """Several torch Linears fused into one Dense along its output axis, in the order given (q, k, v)."""
  return {f"{ours}/kernel": Rule(tuple(f"{t}.weight" for t in theirs), linear_kernel),
          f"{ours}/bias": Rule(tuple(f"{t}.bias" for t in theirs))}


def layer_norm(ours: str, theirs: str) -> Table:
  return {f"{ours}/scale": Rule((f"{theirs}.weight",)), f"{ours}/bias": Rule((f"{theirs}.bias",))}


def mlp(ours: str, theirs: str, fc1: str = "fc1", fc2: str = "fc2") -> Table:
  return {**dense(f"{ours}/fc1", f"{theirs}.{fc1}"), **dense(f"{ours}/fc2", f"{theirs}.{fc2}")}


def grouping_block(ours: str, theirs: str, cross_out: str) -> Table:
  """Our GroupingBlock <- GroupViT's (transformers' GroupViTTokenAssign and NVlabs' GroupingBlock share the
  names, except the cross-attention's output Linear: `cross_out`)."""
  pre = f"{theirs}.pre_assign_attn"
  return {
      **layer_norm(f"{ours}/norm_tokens", f"{theirs}.norm_tokens"),
      **mlp(f"{ours}/mlp_inter/mlp", f"{theirs}.mlp_inter"),
      **layer_norm(f"{ours}/norm_post_tokens", f"{theirs}.norm_post_tokens"),
      **layer_norm(f"{ours}/norm_x", f"{theirs}.norm_x"),
      **dense(f"{ours}/pre_assign_attn/attn/q_proj", f"{pre}.attn.q_proj"),
      **fused_dense(f"{ours}/pre_assign_attn/attn/kv_proj", [f"{pre}.attn.k_proj", f"{pre}.attn.v_proj"]),
      **dense(f"{ours}/pre_assign_attn/attn/out_proj", f"{pre}.attn.{cross_out}"),
      **layer_norm(f"{ours}/pre_assign_attn/norm2", f"{pre}.norm2"),
      **mlp(f"{ours}/pre_assign_attn/mlp", f"{pre}.mlp"),
      **layer_norm(f"{ours}/pre_assign_attn/norm_post", f"{pre}.norm_post"),
      **{k: r for x in ("q_proj", "k_proj", "v_proj", "proj")
         for k, r in dense(f"{ours}/assign/{x}", f"{theirs}.assign.{x}").items()},
      **layer_norm(f"{ours}/norm_new_x", f"{theirs}.norm_new_x"),
      **mlp(f"{ours}/mlp_channels", f"{theirs}.mlp_channels"),
  }


def vision_stages(vision_config: ml_collections.ConfigDict, block: Callable[[str, str], Table], stage: str,
                  blocks: str, cross_out: str) -> Table:
  """Our image-tower stages (config.model.vision): Transformer blocks, group tokens, grouping blocks and group
  projectors. GroupViT's formats share the names below a stage, except the blocks' (`block(ours, theirs)`):

  stage: their stage prefix with {i} ("vision_model.encoder.stages.{i}"); blocks: its block list ("layers").
  """
  table: Table = {}
  for i, depth in enumerate(vision_config.depths):
    ours, theirs = f"params/vision_model/stages_{i}", stage.format(i=i)
    for j in range(depth):
      table.update(block(f"{ours}/layers_{j}", f"{theirs}.{blocks}.{j}"))
    if vision_config.num_group_tokens[i]:
      table[f"{ours}/group_token"] = Rule((f"{theirs}.group_token",))
      table.update(grouping_block(f"{ours}/downsample", f"{theirs}.downsample", cross_out))
      if i > 0:  # group_projector = Sequential(LayerNorm, MixerMlp).
        table.update(layer_norm(f"{ours}/group_projector_norm", f"{theirs}.group_projector.0"))
        table.update(mlp(f"{ours}/group_projector/mlp", f"{theirs}.group_projector.1"))
  return table


def flatten(tree) -> Dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}."""
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """{"a/b/c": leaf} -> nested dict."""
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
  return {k: tuple(x.shape) for k, x in flatten(variables).items()}


def check_coverage(table: Table, shapes: Mapping[str, Tuple[int, ...]]) -> None:
  """The table has one row per variable of the model (else the table is out of date with the model)."""
  if set(table) != set(shapes):
    raise AssertionError(f"The name mapping does not cover the model: not mapped {sorted(set(shapes) - set(table))}, "
                         f"not in the model {sorted(set(table) - set(shapes))}.")


def apply_table(state: Mapping[str, np.ndarray], table: Table, shapes: Mapping[str, Tuple[int, ...]],
                where: str) -> Dict[str, Any]:
  """torch state dict (numpy) -> our variables {"params", "batch_stats"} (float32 numpy) through `table`.

  shapes: target_shapes of the model. where: what to check the weights against, for the shape error message.
  """
  check_coverage(table, shapes)
  used = {name for rule in table.values() for name in rule.sources}
  missing = sorted(used - set(state))
  if missing:
    raise KeyError(f"Tensor(s) missing from the checkpoint: {missing}.")
  unexpected = sorted(k for k in state if k not in used and not k.endswith(IGNORED_SUFFIXES))
  if unexpected:
    raise KeyError(f"Unexpected tensor(s) in the checkpoint (not in {where}'s architecture): {unexpected}.")
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
            f"expects {part_shape}{' per fused part' if fused else ''} (check {where} against the weights).")
      parts.append(part)
    flat[path] = np.concatenate(parts, axis=-1) if fused else parts[0]
  return unflatten(flat)


def invert_table(variables: Mapping[str, Any], table: Table) -> Dict[str, np.ndarray]:
  """Our variables {"params", "batch_stats"} -> the torch state dict of `table` (float32 numpy, contiguous).

  Every variable must have a row (check_coverage); a fused variable is split evenly along its last axis.
  """
  flat = flatten(variables)
  check_coverage(table, {k: v.shape for k, v in flat.items()})
  state = {}
  for path, rule in table.items():
    value = np.asarray(flat[path], np.float32)
    parts = np.split(value, len(rule.sources), axis=-1) if len(rule.sources) > 1 else [value]
    for name, part in zip(rule.sources, parts):
      state[name] = np.array(INVERSE[rule.transform](part), order="C")  # (ascontiguousarray makes 0-d 1-d)
  return state
