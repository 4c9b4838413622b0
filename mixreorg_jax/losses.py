"""Losses of GroupViT and MixReorg as pure functions of embeddings.

Under `jax.jit` with the batch sharded over the mesh, every [B, B] logit matrix here spans the **global** batch:
XLA inserts the all-gathers, so the contrastive loss is exactly the one of a single device holding the whole batch
(GroupViT#28/#42: a real global batch matters).
"""
from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import optax


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE. image_emb, text_emb: [B, D], L2-normalised; scale: scalar. -> scalar."""
  logits = scale * image_emb @ text_emb.T  # [B, B]
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return 0.5 * (image_to_text + text_to_image)


def multi_label_loss(image_emb: jax.Array, noun_emb: jax.Array, scale: jax.Array) -> jax.Array:
  """GroupViT's multi-label contrastive loss over noun prompts.

  image_emb: [B, D]; noun_emb: [B, M, D] (M prompted nouns per caption), all L2-normalised. Each image is a
  positive for its own M prompts (soft target 1/M over them) against all B*M prompts, and each prompt has its
  image as the single positive among the B images.
  """
  b, m, d = noun_emb.shape
  prompts = noun_emb.reshape(b * m, d)
  logits = scale * image_emb @ prompts.T  # [B, B*M]
  targets = jnp.repeat(jnp.eye(b, dtype=logits.dtype), m, axis=1) / m  # [B, B*M]
  image_to_text = optax.softmax_cross_entropy(logits, targets).mean()
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, jnp.repeat(jnp.arange(b), m)).mean()
  return 0.5 * (image_to_text + text_to_image)


def noun_segment_loss(segment_emb: jax.Array, noun_emb: jax.Array, noun_tokens: jax.Array,
                      scale: jax.Array) -> jax.Array:
  """Not in the paper: every noun prompt must be matched by one segment of its own image.

  segment_emb: [B, G, D] normalised segment embeddings; noun_emb: [B, M, D] normalised prompts of each caption's
  nouns (multi-label prompts); noun_tokens: int [B, M, L] their token ids; scale: scalar. The affinity of prompt
  (i, m) with image j is its best segment, max_g cos(s_{j,g}, n_{i,m}) (a multiple-instance match: one segment
  must carry the noun, the others are free). Over the images of the batch, cross-entropy of scale * affinity
  with every image whose prompts include the same prompt as a positive (images that share a noun are not
  negatives). -> scalar.
  """
  b, m, _ = noun_emb.shape
  affinity = jnp.einsum("jgd,imd->imjg", segment_emb, noun_emb).max(axis=-1)  # [B, M, B]
  logits = scale * affinity
  same = same_prompt(noun_tokens).reshape(b, m, b, m).any(axis=-1)  # [B, M, B]
  positive = jnp.where(same, logits, -jnp.inf)
  return (jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(positive, axis=-1)).mean()


def segment_noun_loss(segment_emb: jax.Array, noun_emb: jax.Array, noun_tokens: jax.Array,
                      scale: jax.Array) -> jax.Array:
  """Not in the paper: each image's segments must name its own nouns, against every other noun of the batch.

  The other direction of `noun_segment_loss`, over prompts instead of images. segment_emb: [B, G, D]; noun_emb:
  [B, M, D] normalised prompts; noun_tokens: int [B, M, L]; scale: scalar. With a[u, j] = max_g cos(s_{j,g}, n_u)
  the best segment of image j for prompt u (u over the B*M prompts of the batch), each own prompt (j, m) of image
  j is the target of a softmax of scale * a[., j] over the batch's *distinct* prompts (a prompt that occurs c
  times enters the normaliser once, by weight 1/c). Nouns absent from an image are its negatives, so no segment
  of an image may be nearer an absent noun than its own nouns -- which is how zero-shot segmentation names
  segments: a softmax over class prompts. -> scalar.
  """
  b, m, _ = noun_emb.shape
  prompts = noun_emb.reshape(b * m, -1)
  logits = scale * jnp.einsum("jgd,ud->jug", segment_emb, prompts).max(axis=-1)  # [B, B*M]
  normaliser = _logsumexp_over_distinct_prompts(logits, noun_tokens)  # [B]
  own = jnp.take_along_axis(logits, jnp.arange(b * m).reshape(b, m), axis=1)  # [B, M]: a[(j, m), j]
  return (normaliser[:, None] - own).mean()


def segment_naming_loss(segment_emb: jax.Array, noun_emb: jax.Array, noun_tokens: jax.Array,
                        scale: jax.Array) -> jax.Array:
  """Not in the paper: the segment that best matches each noun must be named by it, as zero-shot segmentation
  names one segment: by a softmax of that segment over the class prompts.

  segment_emb: [B, G, D]; noun_emb: [B, M, D] normalised prompts; noun_tokens: int [B, M, L]; scale: scalar.
  For the own prompt n_{j,m} of image j, g* = argmax_g cos(s_{j,g}, n_{j,m}) is its segment, and the prompt is
  the target of a softmax of scale * cos(s_{j,g*}, n_u) over the batch's *distinct* prompts u (weighted 1/c as in
  `segment_noun_loss`). The image's other prompts are negatives here: a segment names one thing. Where
  `segment_noun_loss` compares, for each prompt, the image's best segment for it (a different segment per prompt),
  this fixes the segment, so an embedding half-way between two classes' prompts, which the protocol would leave
  under its background threshold, is penalised. The choice of g* is not differentiated. -> scalar.
  """
  b, m, _ = noun_emb.shape
  prompts = noun_emb.reshape(b * m, -1)
  best = jnp.argmax(jnp.einsum("jgd,jmd->jmg", segment_emb, noun_emb), axis=-1)  # [B, M]
  named = jnp.take_along_axis(segment_emb, best[..., None], axis=1)  # [B, M, D]: the segment of each own prompt
  logits = scale * jnp.einsum("jmd,ud->jmu", named, prompts)  # [B, M, B*M]
  normaliser = _logsumexp_over_distinct_prompts(logits, noun_tokens)  # [B, M]
  own = jnp.diagonal(logits.reshape(b * m, b * m)).reshape(b, m)  # [B, M]: each prompt against its own segment
  return (normaliser - own).mean()


def _logsumexp_over_distinct_prompts(logits: jax.Array, noun_tokens: jax.Array) -> jax.Array:
  """logits: [..., B*M] over the batch's prompts; noun_tokens: int [B, M, L] -> [...]: the log-sum-exp in which a
  prompt that occurs c times in the batch enters once (each copy weighted 1/c)."""
  ids = prompt_ids(noun_tokens)
  copies = jnp.zeros(ids.shape, jnp.int32).at[ids].add(1)[ids]  # [B*M]
  return jax.nn.logsumexp(logits - jnp.log(copies.astype(logits.dtype)), axis=-1)


def prompt_ids(noun_tokens: jax.Array) -> jax.Array:
  """noun_tokens: int [B, M, L] -> int [B*M] in [0, B*M): the same id for two of the batch's prompts (flattened
  image-major) exactly when they have the same token ids. By a lexicographic sort, in O(B*M*L) memory."""
  flat = noun_tokens.reshape(-1, noun_tokens.shape[-1])
  order = jnp.lexsort(flat.T[::-1])  # token 0 is the primary key
  ordered = flat[order]
  starts = jnp.any(ordered[1:] != ordered[:-1], axis=-1)  # [B*M - 1]: a new prompt begins
  rank = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(starts, dtype=jnp.int32)])
  return jnp.zeros_like(rank).at[order].set(rank)


def same_prompt(noun_tokens: jax.Array) -> jax.Array:
  """noun_tokens: int [B, M, L] -> bool [B*M, B*M]: whether two of the batch's prompts (flattened image-major)
  have the same token ids."""
  ids = prompt_ids(noun_tokens)
  return ids[:, None] == ids[None, :]


SEG_NEGATIVES = ("group", "batch")
SEG_TARGETS = ("caption", "nouns")


def seg_loss(assignment: jax.Array, segment_emb: jax.Array, text_emb: jax.Array, src: jax.Array,
             scale: jax.Array, group_size: int, negatives: str = "group") -> Tuple[jax.Array, jax.Array]:
  """L_seg of MixReorg: every mixed patch must be matched to the caption of the image it came from.

  assignment: [B, N, G] patch-to-segment (straight-through, so gradients reach the grouping blocks);
  segment_emb: [B, G, D] normalised projected segment tokens of the mixed images; text_emb: [B, D] captions of
  the original images, or [B, M, D] their M noun prompts (not in the paper: config.loss.seg_targets="nouns");
  src: int [B, N] in [0, K); group_size: K. Mixed image i belongs to mixing group q = i // K, whose source
  images are q*K .. q*K + K - 1. With t_j the caption of image j,
    logits[i, p, j] = scale * sum_g A[i, p, g] * cos(s_{i,g}, t_j),
  and with noun prompts n_{j,m}, cos(s_{i,g}, t_j) becomes max_m cos(s_{i,g}, n_{j,m}): a segment matches a
  source by its best noun, as zero-shot segmentation names a segment by its best class prompt. The logits run
  over the K captions of the group (negatives="group", DESIGN.md: K - 1 negatives) or over all B captions of
  the (global) batch (negatives="batch": B - 1 negatives, so a segment must be nearer its source caption than
  every other caption, not only the other K - 1 sources). The target is the source image q*K + src[i, p].
  Returns (mean cross-entropy with the source, pixel accuracy).
  """
  if negatives not in SEG_NEGATIVES:
    raise ValueError(f"config.loss.seg_negatives={negatives!r}: expected one of {SEG_NEGATIVES}.")
  targets = text_emb if text_emb.ndim == 3 else text_emb[:, None, :]  # [B, M, D]; M = 1 for captions.
  b, m, d = targets.shape
  groups = b // group_size
  if negatives == "group":
    # Row i gets the K sources of its group: [B, K, M, D].
    sources = jnp.broadcast_to(targets.reshape(groups, 1, group_size, m, d),
                               (groups, group_size, group_size, m, d)).reshape(b, group_size, m, d)
    seg_to_source = jnp.einsum("bgd,bkmd->bgkm", segment_emb, sources).max(axis=-1)  # [B, G, K]
    target = src
  else:
    seg_to_source = jnp.einsum("bgd,jmd->bgjm", segment_emb, targets).max(axis=-1)  # [B, G, B]
    target = (jnp.arange(b) // group_size * group_size)[:, None] + src  # [B, N]: index of the source caption.
  logits = scale * jnp.einsum("bng,bgk->bnk", assignment.astype(jnp.float32), seg_to_source)  # [B, N, K or B]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
  accuracy = (jnp.argmax(logits, axis=-1) == target).mean()
  return loss, accuracy


def source_noun_loss(assignment: jax.Array, segment_emb: jax.Array, noun_emb: jax.Array, noun_tokens: jax.Array,
                     src: jax.Array, scale: jax.Array, group_size: int) -> jax.Array:
  """Not in the paper: L_seg turned around. In each mixed image, every noun prompt of its K sources must be matched
  best by a segment of the source it was named by.

  assignment: [B, N, G] patch-to-segment of the mixed images (hard); segment_emb: [B, G, D] their normalised
  segment embeddings; noun_emb: [B, M, D] normalised prompts of the original images' nouns; noun_tokens: int
  [B, M, L]; src: int [B, N] in [0, K); scale: scalar; group_size: K. A segment belongs to the source that holds
  most of its patches (its owner; not differentiated). For mixed image i of group q, source j and its prompt
  n = n_{qK+j, m}, the source logits are
    logits[i, j, m, k] = scale * max over the segments g of i that source k owns of cos(s_{i,g}, n),
  and the cross-entropy over the K sources takes every source whose prompts include the same prompt as a
  positive. A (prompt, mixed image) term counts only where each of the K sources owns a segment of the image.

  L_seg asks every patch, background included, to be nearer its own source's caption (or nouns) than the other
  sources'. A background patch can meet that only through what its features carry of its source's objects, since a
  caption names the background in 5 of 14 templates. In three trained demo runs (README, "The demo") the mixed
  segments are 81-84% source-pure, yet their background patches are attributed to their source at chance
  (0.48-0.53) and their object patches at 0.64-0.77. Here only what a caption names is asked for: the segment a noun finds must come from its source, and
  a background segment is free unless its phrase is a noun. -> scalar.
  """
  b, n, g = assignment.shape
  m = noun_emb.shape[1]
  k = group_size
  groups = b // k
  share = jnp.einsum("bng,bnk->bgk", assignment.astype(jnp.float32), jax.nn.one_hot(src, k))  # [B, G, K]
  size = share.sum(axis=-1)  # [B, G]: patches of each segment
  owned = (jax.nn.one_hot(jnp.argmax(share, axis=-1), k) > 0) & (size > 0.5)[..., None]  # [B, G, K]: holds a patch
  owned = jax.lax.stop_gradient(owned)
  # The prompts of each mixed image's sources: [B, K, M, D], and their ids.
  sources = jnp.broadcast_to(noun_emb.reshape(groups, 1, k, m, -1), (groups, k, k, m, noun_emb.shape[-1]))
  sources = sources.reshape(b, k, m, -1)
  cos = jnp.einsum("bgd,bjmd->bjmg", segment_emb, sources)  # [B, K(j), M, G]
  # -2 is below every cosine, so a source that owns no segment never wins (and no inf reaches the gradients).
  per_source = jnp.where(owned.transpose(0, 2, 1)[:, None, None], cos[:, :, :, None, :], -2.0).max(axis=-1)
  logits = scale * per_source  # [B, K(j), M, K(k)]
  ids = prompt_ids(noun_tokens).reshape(groups, 1, k, m)
  ids = jnp.broadcast_to(ids, (groups, k, k, m)).reshape(b, k, m)  # [B, K, M]: the ids of each source's prompts
  positive = (ids[:, :, :, None, None] == ids[:, None, None, :, :]).any(axis=-1)  # [B, K(j), M, K(k)]
  valid = owned.any(axis=1).all(axis=-1)  # [B]: every source owns a segment of the mixed image
  safe = jnp.where(valid[:, None, None, None], logits, 0.0)
  term = jax.nn.logsumexp(safe, axis=-1) - jax.nn.logsumexp(jnp.where(positive, safe, -jnp.inf), axis=-1)
  weight = jnp.broadcast_to(valid[:, None, None], term.shape).astype(term.dtype)
  return (term * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def group_information(soft: jax.Array) -> jax.Array:
  """Mutual information between an image token and its group under a soft assignment, averaged over images.

  soft: [B, N, S], sums to 1 over the S groups. Per image, I = H(mean_n soft[n]) - mean_n H(soft[n]) in nats,
  in [0, log S]: log S when every token is sure of its group and the groups are used equally, 0 when all tokens
  share one assignment -- the collapse that leaves one segment per image. -> scalar.
  """
  return group_information_per_image(soft).mean()


def group_information_per_image(soft: jax.Array) -> jax.Array:
  """The token-group mutual information of each image (see `group_information`). soft: [B, N, S] -> [B]."""
  soft = soft.astype(jnp.float32)
  entropy = lambda p: -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=-1)  # noqa: E731
  return entropy(soft.mean(axis=1)) - entropy(soft).mean(axis=1)


def prompt_uniformity(noun_emb: jax.Array, noun_tokens: jax.Array, temperature: float = 2.0) -> jax.Array:
  """Not in the paper: how crowded the batch's prompts are (Wang & Isola 2020's uniformity).

  noun_emb: [B, M, D] normalised prompts; noun_tokens: int [B, M, L] their token ids. Over the pairs (u, v) of the
  batch's B*M prompts that are different prompts (copies of one prompt are not a pair), log mean exp(-t |n_u -
  n_v|^2) with t = temperature: -2t when they are orthogonal on average, 0 when they coincide. A class named in
  many captions enters as often as it is named, so the term is dominated by the frequent concepts' prompts, not by
  the captions that fill unused slots. Minimising it spreads the prompts over the sphere, against the crowding
  of class prompts (cosine 0.9 between two classes) that makes zero-shot segmentation's softmax over them too
  flat to clear the background threshold. -> scalar (0 when all prompts are one).
  """
  b, m, d = noun_emb.shape
  prompts = noun_emb.reshape(b * m, d)
  pairs = ~same_prompt(noun_tokens)  # [B*M, B*M]: different prompts
  squared_distance = 2.0 - 2.0 * prompts @ prompts.T
  count = pairs.sum()
  log_mean = (jax.nn.logsumexp(jnp.where(pairs, -temperature * squared_distance, -jnp.inf))
              - jnp.log(jnp.maximum(count, 1).astype(prompts.dtype)))
  return jnp.where(count > 0, log_mean, 0.0)


# Ours that need the noun prompts of config.model.multi_label: each weight of config.loss and its term as
# fn(segment_emb [B, G, D], noun_emb [B, M, D], noun_tokens int [B, M, L], scale) -> scalar.
NOUN_TERMS = {
    "w_noun_seg": noun_segment_loss,
    "w_segment_nouns": segment_noun_loss,
    "w_segment_naming": segment_naming_loss,
    "w_prompt_uniformity": lambda segment_emb, noun_emb, noun_tokens, scale: prompt_uniformity(noun_emb, noun_tokens),
}

# Each weight of config.loss, the term of `mixreorg.heads` it multiplies and its sign: L = L_orig + the sum of
# sign * weight * term (I_group is a reward). The terms of the paper first, then ours.
WEIGHTED_TERMS = {"w_rest": ("loss_rest", 1.0), "w_seg": ("loss_seg", 1.0), "w_group_info": ("group_info", -1.0),
                  "w_noun_seg": ("loss_noun_seg", 1.0), "w_segment_nouns": ("loss_segment_nouns", 1.0),
                  "w_segment_naming": ("loss_segment_naming", 1.0),
                  "w_prompt_uniformity": ("loss_prompt_uniformity", 1.0),
                  "w_source_nouns": ("loss_source_nouns", 1.0)}


def total_loss(terms: Dict[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
  """L = L_orig + w_rest * L_rest + w_seg * L_seg - w_group_info * I_group + w_noun_seg * L_noun_seg
  + w_segment_nouns * L_segment_nouns + w_segment_naming * L_segment_naming
  + w_prompt_uniformity * L_prompt_uniformity + w_source_nouns * L_source_nouns. weights: config.loss (a weight it lacks is 0); a term missing
  from `terms` counts as 0."""
  loss = terms["loss_orig"]
  for weight, (term, sign) in WEIGHTED_TERMS.items():
    if weights.get(weight, 0.0) and term in terms:
      loss = loss + sign * weights[weight] * terms[term]
  return loss
