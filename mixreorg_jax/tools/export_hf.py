r"""Exports an inference checkpoint as a transformers GroupViT directory that `GroupViTModel.from_pretrained` loads.

  python -m mixreorg_jax.tools.export_hf --checkpoint=exports/demo --output=hf/demo [--swap_eot_id]

The checkpoint is any `inference.load` directory: converted GroupViT weights, or a trained model exported with
tools/export.py. HF_DIR gets `config.json`, `model.safetensors` (float32) and `preprocessor_config.json` (the
pixel statistics the weights expect), and with the CLIP BPE tokenizer `vocab.json`, `merges.txt` and
`tokenizer_config.json`, so that `CLIPTokenizer.from_pretrained(HF_DIR)` gives our ids. The tensors are those of
convert_groupvit's name mapping, run backwards, so HF -> ours -> HF gives the same tensors back.

At inference MixReorg is GroupViT, so every model exports, except where transformers' GroupViT cannot compute
what ours does; then the export stops and says why, instead of writing a model that differs:
* Soft grouping (config.model.vision.hard_assignment=False): transformers' grouping is always hard.
* End-of-text id 2 (our SentencePiece models): transformers reads `eos_token_id == 2` as the legacy CLIP rule
  and pools the text at the largest token id, not at the end-of-text token. `--swap_eot_id` writes the text tower
  with ids 2 and vocab_size - 1 exchanged (eos_token_id = vocab_size - 1, recorded as `mixreorg_swapped_ids` in
  config.json); token ids from our tokenizer must then be swapped the same way (`swap_ids`). The image tower is
  the same either way.
The multi-label logit scale (a training-only parameter) has no place in transformers' GroupViT and is left out.
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from safetensors import numpy as safetensors_numpy

from mixreorg_jax import checkpoint_io
from mixreorg_jax.data import pixels
from mixreorg_jax.data import tokenizers
from mixreorg_jax.tools import convert_groupvit
from mixreorg_jax.tools import state_dicts as sd

# Our activation names -> transformers' (the inverse of convert_groupvit.ACTIVATIONS).
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
LEGACY_EOS_ID = 2  # transformers' GroupViTTextTransformer: eos_token_id == 2 pools at argmax(input_ids).
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
TRAINING_ONLY = ("params/multi_label_logit_scale",)


def swap_ids(tokens: np.ndarray, swapped: Optional[Tuple[int, int]]) -> np.ndarray:
  """Our token ids [..., L] -> the ids of a text tower exported with --swap_eot_id (unchanged when None)."""
  if swapped is None:
    return tokens
  a, b = swapped
  return np.where(tokens == a, b, np.where(tokens == b, a, tokens))


def check_exportable(model_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the config key, where transformers' GroupViT cannot compute what ours does."""
  v, t = model_config.vision, model_config.text
  if not v.hard_assignment:
    raise ValueError("config.model.vision.hard_assignment=False: transformers' GroupViT always groups with hard "
                     "(argmax) assignments, so its image embeddings would differ; this model cannot be exported.")
  for where, act in (("vision", v.act), ("text", t.act)):
    if act not in HF_ACTIVATIONS:
      raise ValueError(f"config.model.{where}.act={act!r} has no transformers equivalent; expected one of "
                       f"{sorted(HF_ACTIVATIONS)}.")


def eos_token_id(model_config: ml_collections.ConfigDict,
                 swap_eot_id: bool) -> Tuple[int, Optional[Tuple[int, int]]]:
  """-> (transformers' eos_token_id, the exchanged ids or None) for our end-of-text id."""
  eot, vocab = model_config.text.eot_id, model_config.text.vocab_size
  if eot != LEGACY_EOS_ID:
    return eot, None
  if not swap_eot_id:
    raise ValueError(
        f"config.model.text.eot_id={eot}: transformers reads eos_token_id == {LEGACY_EOS_ID} as the legacy CLIP rule "
        "and pools the text at the largest token id instead of the end-of-text token, so the exported text "
        "embeddings would differ from ours. Pass --swap_eot_id to write the text tower with ids "
        f"{eot} and {vocab - 1} exchanged (eos_token_id={vocab - 1}; swap the ids of our tokenizer the same way, "
        "tools/export_hf.swap_ids).")
  return vocab - 1, (eot, vocab - 1)


def hf_config(model_config: ml_collections.ConfigDict, eos: int, bos: int, pad: int) -> Dict[str, Any]:
  """Our config.model -> transformers' GroupViTConfig as a config.json dict."""
  v, t = model_config.vision, model_config.text
  return {
      "architectures": ["GroupViTModel"],
      "model_type": "groupvit",
      "dtype": "float32",
      "projection_dim": int(model_config.projection_dim),
      "projection_intermediate_dim": int(model_config.projection_hidden_dim),
      "logit_scale_init_value": float(model_config.logit_scale_init),
      "vision_config": {
          "model_type": "groupvit_vision_model",
          "hidden_size": int(v.width), "intermediate_size": int(v.width * v.mlp_ratio),
          "num_hidden_layers": int(sum(v.depths)), "depths": [int(d) for d in v.depths],
          "num_group_tokens": [int(n) for n in v.num_group_tokens],
          "num_output_groups": [int(n) for n in v.num_output_groups], "num_attention_heads": int(v.num_heads),
          "image_size": int(v.image_size), "patch_size": int(v.patch_size), "num_channels": 3,
          "hidden_act": HF_ACTIVATIONS[v.act], "layer_norm_eps": 1e-5, "assign_eps": float(v.assign_eps),
          "assign_mlp_ratio": [float(r) for r in v.assign_mlp_ratio],
      },
      "text_config": {
          "model_type": "groupvit_text_model",
          "vocab_size": int(t.vocab_size), "hidden_size": int(t.width), "intermediate_size": int(t.mlp_dim),
          "num_hidden_layers": int(t.num_layers), "num_attention_heads": int(t.num_heads),
          "max_position_embeddings": int(t.context_length), "hidden_act": HF_ACTIVATIONS[t.act],
          "layer_norm_eps": 1e-5, "eos_token_id": int(eos), "bos_token_id": int(bos), "pad_token_id": int(pad),
      },
  }


def hf_state_dict(variables: Mapping[str, Any], model_config: ml_collections.ConfigDict) -> Dict[str, np.ndarray]:
  """Our variables {"params", "batch_stats"} -> transformers GroupViTModel tensors (float32; BatchNorm counters 0)."""
  flat = {k: v for k, v in sd.flatten(variables).items() if k not in TRAINING_ONLY}
  state = sd.invert_table(sd.unflatten(flat), convert_groupvit.name_mapping(model_config))
  for projection in ("visual_projection", "text_projection"):
    state[f"{projection}.1.num_batches_tracked"] = np.zeros((), np.int64)
  return state


def write_clip_tokenizer(tokenizer, output: str) -> None:
  """vocab.json, merges.txt and tokenizer_config.json of our ClipBpeTokenizer, for transformers.CLIPTokenizer."""
  with open(os.path.join(output, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(tokenizer.encoder, f, ensure_ascii=False)
  merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
  with open(os.path.join(output, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  vocab = {i: tok for tok, i in tokenizer.encoder.items()}
  with open(os.path.join(output, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length,
               "bos_token": vocab[tokenizer.bos_id], "eos_token": vocab[tokenizer.eot_id],
               "unk_token": vocab[tokenizer.eot_id], "pad_token": vocab[tokenizer.pad_id]}, f, indent=2)


def write_preprocessor_config(image_size: int, normalization: str, output: str) -> None:
  """preprocessor_config.json: CLIPImageProcessor with the pixel statistics the weights expect."""
  mean, std = pixels.pixel_statistics(normalization)
  with open(os.path.join(output, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True,
               "size": {"shortest_edge": image_size}, "do_center_crop": True,
               "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
               "do_convert_rgb": True}, f, indent=2)


def _tokenizer(block: Optional[Dict[str, Any]], vocab_size: int):
  """The checkpoint's tokenizer, or None (logged) when it has none, its vocabulary file is not here, or it has
  more ids than the model's vocab_size."""
  if not block:
    return None
  try:
    tokenizer = tokenizers.checkpoint_tokenizer(block)
  except FileNotFoundError as e:
    logging.warning("No tokenizer files written: %s", e)
    return None
  if tokenizer.vocab_size > vocab_size:
    logging.warning("No tokenizer files written: the checkpoint's tokenizer has %d ids, config.model.text."
                    "vocab_size is %d.", tokenizer.vocab_size, vocab_size)
    return None
  return tokenizer


def export_hf(checkpoint: str, output: str, swap_eot_id: bool = False) -> str:
  """Writes the inference checkpoint `checkpoint` as a transformers GroupViT directory `output` -> its path."""
  variables, saved = checkpoint_io.load_inference_checkpoint(checkpoint)
  model_config = saved.model
  check_exportable(model_config)
  eos, swapped = eos_token_id(model_config, swap_eot_id)
  if os.path.exists(os.path.join(output, "model.safetensors")):
    raise FileExistsError(f"{output}/model.safetensors already exists; choose another --output or delete it.")
  tokenizer = _tokenizer(saved.tokenizer, model_config.text.vocab_size)
  bos, pad = (tokenizer.bos_id, tokenizer.pad_id) if tokenizer is not None else (eos - 1, 0)
  state = hf_state_dict(variables, model_config)
  config = hf_config(model_config, eos, *swap_ids(np.array([bos, pad]), swapped).tolist())
  if swapped is not None:
    state[TOKEN_EMBEDDING] = state[TOKEN_EMBEDDING][swap_ids(np.arange(model_config.text.vocab_size), swapped)]
    config["mixreorg_swapped_ids"] = list(swapped)
    logging.warning("Text tower written with token ids %d and %d exchanged: swap them in our tokenizer's ids "
                    "(export_hf.swap_ids) before transformers' text model.", *swapped)
  if model_config.multi_label:
    logging.info("Left out the multi-label logit scale: transformers' GroupViT has none (training only).")
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  safetensors_numpy.save_file(state, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
  write_preprocessor_config(model_config.vision.image_size, saved.image_normalization, output)
  if tokenizer is not None and saved.tokenizer["kind"] == "clip_bpe":
    write_clip_tokenizer(tokenizer, output)
  elif tokenizer is not None:
    logging.info("No tokenizer files: transformers has no tokenizer for our %s model; tokenize with ours "
                 "(mixreorg_jax.data.tokenizers).", saved.tokenizer["kind"])
  return os.path.abspath(output)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string("checkpoint", None, "An inference checkpoint directory (converted, or from tools/export.py).")
  flags.DEFINE_string("output", None, "The transformers GroupViT directory to write.")
  flags.DEFINE_bool("swap_eot_id", False, "End-of-text id 2 only: write the text tower with ids 2 and "
                    "vocab_size - 1 exchanged, so that transformers pools at the end-of-text token.")
  flags.mark_flags_as_required(["checkpoint", "output"])


def main(argv: List[str]) -> None:
  console.to_log_file(console.tool_log_path("export_hf"))
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(export_hf(FLAGS.checkpoint, FLAGS.output, FLAGS.swap_eot_id))


if __name__ == "__main__":
  define_flags()
  app.run(main)
