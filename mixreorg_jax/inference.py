"""Inference API over an inference checkpoint (converted GroupViT weights or a trained-model export).

  model = inference.load("/path/to/checkpoint")
  images = zeroshot.normalize_image(pixels, model.image_normalization)  # uint8 [B, H, W, 3] -> float32
  image_emb = model.encode_image(images)        # float32 [B, H, W, 3], normalised -> [B, D], L2-normalised
  text_emb = model.encode_text(token_ids)       # int32 [B, L] -> [B, D], L2-normalised
  groups = model.group_assignments(images)      # [B, N, G], soft patch-to-segment, rows sum to 1

Everything runs in eval mode (no Gumbel noise, BatchNorm running statistics). Pixel-level class logits are in the
zero-shot segmentation module, built on `segment_embeddings`.
"""
import functools
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections

from mixreorg_jax import checkpoint_io
from mixreorg_jax.models import grouping
from mixreorg_jax.models import groupvit


class InferenceModel:
  """A GroupViT with its variables, and jitted eval-mode encoders.

  Attributes: `model` (the flax module), `variables` ({"params", "batch_stats"}), `config` (config.model) and
  `tokenizer` (the checkpoint's tokenizer block {"kind", "path", "context_length"}, or None) and
  `image_normalization` (the pixel statistics the weights expect: "clip" or "imagenet", see
  `zeroshot.normalize_image`).
  """

  def __init__(self, model: groupvit.GroupViT, variables: Dict[str, Any], config: ml_collections.ConfigDict,
               tokenizer: Optional[Dict[str, Any]] = None, image_normalization: str = "clip"):
    self.model = model
    self.variables = variables
    self.config = config
    self.tokenizer = tokenizer
    self.image_normalization = image_normalization
    self._image = jax.jit(self._image_outputs)
    self._encode_text = jax.jit(functools.partial(model.apply, method=groupvit.GroupViT.encode_text))

  def _image_outputs(self, variables, images):
    """-> (embedding [B, D], segment embeddings [B, G, D], soft patch-to-segment assignment [B, N, G])."""
    enc = self.model.apply(variables, images, method=groupvit.GroupViT.encode_image)
    soft = grouping.patch_to_segment([a.soft for a in enc.assignments])
    return enc.embedding, enc.segment_embeddings, soft

  def encode_image(self, images: jax.Array) -> jax.Array:
    """images float32 [B, H, W, 3], normalised -> [B, D], L2-normalised."""
    return self._image(self.variables, images)[0]

  def encode_text(self, token_ids: jax.Array) -> jax.Array:
    """token_ids int32 [B, L] (each row has the end-of-text id) -> [B, D], L2-normalised."""
    return self._encode_text(self.variables, token_ids)

  def segment_embeddings(self, images: jax.Array) -> Tuple[jax.Array, jax.Array, Tuple[int, int]]:
    """images [B, H, W, 3] -> (segment embeddings [B, G, D] L2-normalised, soft assignment [B, N, G], grid).

    The assignment chains the soft (noise-free softmax) assignments of every grouping stage, as GroupViT's
    zero-shot segmentation does; N = grid[0] * grid[1] patches in row-major order.
    """
    _, segments, soft = self._image(self.variables, images)
    p = self.config.vision.patch_size
    return segments, soft, (images.shape[1] // p, images.shape[2] // p)

  def group_assignments(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> soft patch-to-final-segment assignment [B, N, G]; each row sums to 1."""
    return self._image(self.variables, images)[2]


def load(checkpoint_dir: str) -> InferenceModel:
  """Loads a checkpoint written by `checkpoint_io.save_inference_checkpoint` (converter or trainer export)."""
  variables, saved = checkpoint_io.load_inference_checkpoint(checkpoint_dir)
  return InferenceModel(groupvit.GroupViT.from_config(saved.model), variables, saved.model, saved.tokenizer,
                        saved.image_normalization)
