"""The pixel statistics images are normalised with, in training (tf.data) and at inference (numpy): no TF here.

A checkpoint records the name of the statistics its weights were trained with (`image_normalization`).
"""
from typing import Tuple

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel statistics, on [0, 1] pixels.
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what GroupViT's public weights were trained and evaluated with
IMAGENET_STD = (0.229, 0.224, 0.225)  # (timm's DeiT transform; mmseg img_norm_cfg 123.675/58.395, ...).
PIXEL_STATISTICS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def pixel_statistics(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
  """(mean, std) on [0, 1] pixels of config.input.normalization / a checkpoint's image_normalization."""
  if name not in PIXEL_STATISTICS:
    raise ValueError(f"image normalization {name!r}: expected one of {sorted(PIXEL_STATISTICS)} "
                     "(config.input.normalization).")
  return PIXEL_STATISTICS[name]
