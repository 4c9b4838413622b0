"""The project's one inference-checkpoint format: model variables plus the model config that builds them.

A directory written by `save_inference_checkpoint` holds

  DIR/variables/          an orbax checkpoint of {"params": ..., "batch_stats": ...} (float32 arrays)
  DIR/model_config.json   config.model as JSON, plus an optional "tokenizer" block
                          {"kind": "clip_bpe" | "sentencepiece", "path": ..., "context_length": ...}
                          and "image_normalization": the pixel statistics the weights expect ("clip" for
                          models trained here by default, "imagenet" for GroupViT's public weights)

Both the GroupViT converter (`tools/convert_groupvit.py`) and the trainer's export write it, and
`inference.load` reads it, so a converted and a trained model load the same way.
"""
import json
import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

VARIABLES_DIR = "variables"
CONFIG_FILE = "model_config.json"
TOKENIZER_KINDS = ("clip_bpe", "sentencepiece")


def tokenizer_info(kind: str, path: str, context_length: int) -> Dict[str, Any]:
  """The `tokenizer` block of model_config.json; `kind` as config.input.tokenizer."""
  if kind not in TOKENIZER_KINDS:
    raise ValueError(f"tokenizer kind {kind!r}: expected one of {TOKENIZER_KINDS} (config.input.tokenizer).")
  return {"kind": kind, "path": str(path), "context_length": int(context_length)}


def _host_arrays(tree):
  """Local arrays as numpy; arrays sharded over several hosts stay jax.Arrays (orbax writes them collectively)."""
  def convert(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    return np.asarray(jax.device_get(x))
  return jax.tree.map(convert, tree)


def save_inference_checkpoint(directory: str, variables: Mapping[str, Any],
                              model_config: ml_collections.ConfigDict,
                              tokenizer: Optional[Mapping[str, Any]] = None,
                              image_normalization: str = "clip") -> str:
  """Writes `variables` ({"params", "batch_stats"}) and `model_config` (config.model) into `directory`.

  tokenizer: optional `tokenizer_info(...)` block stored alongside the model config. image_normalization: the
  pixel statistics the weights were trained with (config.input.normalization). The write is synchronous and
  refuses to overwrite an existing checkpoint. Returns the absolute directory.
  """
  directory = os.path.abspath(directory)
  target = os.path.join(directory, VARIABLES_DIR)
  if os.path.exists(target):
    raise FileExistsError(f"{target} already exists; choose another output directory or delete it first.")
  if "params" not in variables:
    raise ValueError(f"variables must have a 'params' collection; got {sorted(variables)}.")
  tree = {"params": _host_arrays(variables["params"]),
          "batch_stats": _host_arrays(variables.get("batch_stats", {}))}
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, tree)
  config = {"model": model_config.to_dict(), "image_normalization": str(image_normalization)}
  if tokenizer is not None:
    config["tokenizer"] = tokenizer_info(tokenizer["kind"], tokenizer["path"], tokenizer["context_length"])
  if jax.process_index() == 0:  # every host calls this (orbax saves collectively); one writes the config.
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  return directory


def lists_to_tuples(value):
  """JSON turns tuples (depths, num_group_tokens, ...) into lists; the model config uses tuples."""
  if isinstance(value, dict):
    return {k: lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(lists_to_tuples(v) for v in value)
  return value


class CheckpointConfig(NamedTuple):
  """What DIR/model_config.json says about the weights beside it."""
  model: ml_collections.ConfigDict  # config.model
  tokenizer: Optional[Dict[str, Any]]  # the tokenizer block, or None
  image_normalization: str  # the pixel statistics the weights expect ("clip" when the checkpoint does not say)


def load_model_config(directory: str) -> CheckpointConfig:
  """Reads DIR/model_config.json."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: {directory!r} is not an inference checkpoint (expected {CONFIG_FILE} and "
        f"{VARIABLES_DIR}/, as written by save_inference_checkpoint or tools/convert_groupvit.py).")
  with open(path) as f:
    config = json.load(f)
  if "model" not in config:
    raise ValueError(f"{path} has no 'model' block; it was not written by save_inference_checkpoint.")
  return CheckpointConfig(ml_collections.ConfigDict(lists_to_tuples(config["model"])), config.get("tokenizer"),
                          config.get("image_normalization", "clip"))


def load_inference_checkpoint(directory: str) -> Tuple[Dict[str, Any], CheckpointConfig]:
  """-> (variables {"params", "batch_stats"} of jax arrays, the checkpoint's CheckpointConfig)."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Checkpoint directory {directory} does not exist.")
  checkpoint_config = load_model_config(directory)
  target = os.path.join(directory, VARIABLES_DIR)
  if not os.path.isdir(target):
    raise FileNotFoundError(f"{target} not found: the checkpoint in {directory} has no variables.")
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(target)
  return dict(variables), checkpoint_config
