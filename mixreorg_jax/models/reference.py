"""The reference architecture: GroupViT's official gcc_yfcc_30e model (NVlabs configs/group_vit_gcc_yfcc_30e.yml).

`config.model` of every training config starts from `reference_model_config()`; the converters read the keys and
defaults of a model config from it, so that nothing inside the package imports the top-level `configs/`.
"""
import math

import ml_collections


def reference_model_config() -> ml_collections.ConfigDict:
  """config.model of the reference: a 3-stage ViT-S/16 grouping tower and a 12-layer text Transformer."""
  m = ml_collections.ConfigDict()
  m.dtype = "float32"  # compute dtype; parameters stay float32. "bfloat16" for mixed precision.
  m.remat = False  # rematerialise every Transformer block.
  m.mixreorg = True  # False = the plain GroupViT step (no mixed or restored branch).
  m.multi_label = True
  # Captions and noun prompts through the text projector as one batch, so that its BatchNorm normalises both
  # with the same statistics, as GroupViT's encode_text of [B, 1 + M, L] does (False: one batch each).
  m.joint_text_projection = True
  m.projection_dim = 256
  m.projection_hidden_dim = 4096
  m.logit_scale_init = math.log(1 / 0.07)
  m.logit_scale_max = 100.0
  m.vision = ml_collections.ConfigDict(dict(
      width=384, num_heads=6, depths=(6, 3, 3), num_group_tokens=(64, 8, 0), num_output_groups=(64, 8, 8),
      patch_size=16, image_size=224, mlp_ratio=4.0, assign_mlp_ratio=(0.5, 4.0), assign_eps=1.0,
      hard_assignment=True, gumbel=True, gumbel_tau=1.0, drop_path_rate=0.1, act="gelu"))
  m.text = ml_collections.ConfigDict(dict(
      vocab_size=49408, width=256, num_layers=12, num_heads=4, mlp_dim=1024, context_length=77,
      eot_id=49407, act="quick_gelu"))
  return m
