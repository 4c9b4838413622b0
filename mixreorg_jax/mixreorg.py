"""The MixReorg training forward and its losses (MixReorg, ICCV 2023, Sec. 3; DESIGN.md "training forward").

1. Contextual mixing: the original images run through the first `context_layers` blocks of stage 1, then their
   image tokens are mixed across groups of K images (`mixing.mix`); the mixed branch starts from the learned
   stage-1 group tokens.
2. Progressive mixing: the remaining stage-1 blocks run on both branches in one batched call; after each block
   the original features enhance the mixed ones, m <- (1 - beta) m + beta Mix_sigma(x).
3. Mixing restoration: restored = Unmix_sigma(m). Original, mixed and restored features then go through the rest
   of the encoder (grouping block 1, stage 2, grouping block 2, stage 3) as one 3B batch.
4. Losses: L = L_orig + w_rest L_rest + w_seg L_seg, minus w_group_info I_group if that weight is set (not in
   the paper: the token-group mutual information of every grouping block, which keeps the grouping from
   collapsing onto one segment per image; `losses.group_information`). I_group is logged either way.

`forward` is applied as a method of the GroupViT module (`model.apply(..., method=forward)`), so it reads the
architecture from the model and adds only the mixing. With `mixreorg=False` it is exactly GroupViT's step.
It is `heads(towers(batch))`: `towers` is everything that is per example (steps 1-3 and the text tower, up to the
projectors), `heads` the projectors and the losses over the whole batch (step 4). The micro-batched train step
runs `towers` a micro-batch at a time and `heads` once (train_step.micro_batched_grads).
"""
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from mixreorg_jax import losses
from mixreorg_jax import mixing
from mixreorg_jax.models import grouping
from mixreorg_jax.models import groupvit


def _image_branches(model: groupvit.GroupViT, images, mix_config, mixreorg: bool, train: bool):
  """Runs the image tower. -> (segments [R*B, G, C], assignments, src [B, N] or None), R = 3 with mixing else 1."""
  vision = model.vision_model
  if not mixreorg:  # GroupViT's image tower as it is.
    out = vision(images, train)
    return out.segment_tokens, out.assignments, None
  first = vision.stages[0]
  x, _ = vision.embed(images)  # [B, N, C]
  b = x.shape[0]
  k, context, beta = mix_config.group_size, mix_config.context_layers, mix_config.progressive_weight
  if not 0 <= context <= first.depth:
    raise ValueError(f"config.mix.context_layers={context} must be in [0, {first.depth}] (the depth of stage 1, "
                     "config.model.vision.depths[0]).")
  # 1. Contextual mixing.
  x, group_tokens = first.split(first.run_blocks(vision.first_stage_tokens(x), 0, context, train))
  mixed, src, perm = mixing.mix(x, model.make_rng("mix"), k)
  fresh_group_tokens = first.initial_group_tokens(b, None).astype(x.dtype)
  # 2. Progressive mixing: both branches in one batched call per block.
  both = jnp.concatenate([x, mixed], axis=0)  # [2B, N, C]
  both_groups = jnp.concatenate([group_tokens, fresh_group_tokens], axis=0)  # [2B, S, C]
  for i in range(context, first.depth):
    both, both_groups = first.split(first.run_blocks(jnp.concatenate([both, both_groups], axis=1), i, i + 1,
                                                     train))
    if beta:
      original, mixed = both[:b], both[b:]
      both = jnp.concatenate([original, (1.0 - beta) * mixed + beta * mixing.apply_mix(original, perm)], axis=0)
  original, mixed = both[:b], both[b:]
  # 3. Mixing restoration, then the rest of the encoder on [original; mixed; restored].
  restored = mixing.restore(mixed, perm)
  tokens = jnp.concatenate([original, mixed, restored], axis=0)  # [3B, N, C]
  groups = jnp.concatenate([both_groups, both_groups[b:]], axis=0)  # restored keeps its mixed image's tokens.
  segments, assignments = vision.after_first_blocks(tokens, groups, train)
  return segments, assignments, src


def towers(model: groupvit.GroupViT, batch: Dict[str, jax.Array], config: ml_collections.ConfigDict,
           train: bool = True) -> Tuple[Dict[str, Any], Dict[str, jax.Array]]:
  """The image and text towers up to the projectors: everything of the step that is per example.

  batch: image [B, H, W, 3], text [B, L], optional nouns [B, M, L]. Returns (features, labels). features, which
  the loss is differentiated by: segments [R*B, G, C] (R = 3 with mixing: original, mixed, restored; else 1),
  group_info (per grouping block, the token-group information of every image [R*B]), text [B, C_t], nouns
  [B, M, C_t] with the multi-label loss, mixed_assignment [B, N, G] (the mixed images' patch-to-segment A) with
  mixing. labels (integer): src [B, N] with mixing, noun_tokens [B, M, L] with the multi-label loss.
  Needs rngs 'mix', 'gumbel' and 'dropout' in training.
  """
  mixreorg = config.model.mixreorg
  b = batch["image"].shape[0]
  segments, assignments, src = _image_branches(model, batch["image"], config.mix, mixreorg, train)
  features = {"segments": segments,
              "group_info": tuple(losses.group_information_per_image(a.soft) for a in assignments),
              "text": model.text_features(batch["text"], train)}
  labels = {}
  if model.multi_label:
    features["nouns"] = model.text_features(batch["nouns"], train)
    labels["noun_tokens"] = batch["nouns"]
  if mixreorg:
    features["mixed_assignment"] = grouping.patch_to_segment([a.hard[b:2 * b] for a in assignments])
    labels["src"] = src
  return features, labels


def heads(model: groupvit.GroupViT, features: Dict[str, Any], labels: Dict[str, jax.Array],
          config: ml_collections.ConfigDict, train: bool = True) -> Dict[str, jax.Array]:
  """The projectors, logit scales and every loss, on the whole batch of `towers`' outputs. -> loss terms, metrics.

  Needs mutable 'batch_stats' in training: the projectors' BatchNorm sees the statistics of the whole batch.
  """
  b = features["text"].shape[0]
  segments = features["segments"]
  image_emb, segment_emb = model.project_segments(segments[:b], train)  # only the original branch updates BN.
  if model.multi_label and config.model.joint_text_projection:  # GroupViT: one BatchNorm batch of B * (1 + M).
    both = model.project_text(jnp.concatenate([features["text"][:, None], features["nouns"]], axis=1), train)
    text_emb, noun_emb = both[:, 0], both[:, 1:]  # [B, D], [B, M, D]
  else:
    text_emb = model.project_text(features["text"], train)
    noun_emb = model.project_text(features["nouns"], train) if model.multi_label else None  # [B, M, D]
  scale = model.scale()
  out = {"logit_scale": scale}
  out["loss_orig"] = losses.contrastive_loss(image_emb, text_emb, scale)
  if model.multi_label:
    ml_scale = model.scale("multi_label_logit_scale")
    out["loss_multi_label"] = losses.multi_label_loss(image_emb, noun_emb, ml_scale)
    out["loss_orig"] = out["loss_orig"] + out["loss_multi_label"]
    out["multi_label_logit_scale"] = ml_scale
    for weight, term in losses.NOUN_TERMS.items():  # ours, off unless weighted
      if config.loss[weight]:
        out[losses.WEIGHTED_TERMS[weight][0]] = term(segment_emb, noun_emb, labels["noun_tokens"], ml_scale)
  if config.model.mixreorg:
    restored_emb, _ = model.project_segments(segments[2 * b:], train, update_stats=False)
    out["loss_rest"] = losses.contrastive_loss(restored_emb, text_emb, scale)
    _, mixed_segment_emb = model.project_segments(segments[b:2 * b], train, update_stats=False)
    # Not in the paper: seg_targets="nouns" matches mixed segments with their sources' noun prompts.
    source_emb, seg_scale = (noun_emb, ml_scale) if config.loss.seg_targets == "nouns" else (text_emb, scale)
    out["loss_seg"], out["seg_acc"] = losses.seg_loss(features["mixed_assignment"], mixed_segment_emb, source_emb,
                                                      labels["src"], seg_scale, config.mix.group_size,
                                                      config.loss.seg_negatives)
    if config.loss.w_source_nouns:  # ours: each source's nouns found by its own segments of the mixed image.
      out["loss_source_nouns"] = losses.source_noun_loss(features["mixed_assignment"], mixed_segment_emb, noun_emb,
                                                         labels["noun_tokens"], labels["src"], ml_scale,
                                                         config.mix.group_size)
  # Every branch's assignments (original, mixed, restored), averaged over the grouping blocks.
  info = features["group_info"]
  out["group_info"] = sum(i.mean() for i in info) / max(len(info), 1)
  out["loss"] = losses.total_loss(out, config.loss)
  return out


def forward(model: groupvit.GroupViT, batch: Dict[str, jax.Array], config: ml_collections.ConfigDict,
            train: bool = True) -> Dict[str, jax.Array]:
  """Loss terms and metrics of one batch. batch: image [B, H, W, 3], text [B, L], optional nouns [B, M, L].

  Needs rngs 'mix', 'gumbel' and 'dropout' in training, and mutable 'batch_stats'.
  """
  features, labels = towers(model, batch, config, train)
  return heads(model, features, labels, config, train)
