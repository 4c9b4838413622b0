"""Segment one image with any class names, zero-shot, and draw it.

  python -m mixreorg_jax.segment --checkpoint=DIR --image=IMG [--classes="cat,dog,grass"] [--output=out.png]
  python -m mixreorg_jax.segment --checkpoint=DIR --image=IMG --config=configs/eval/voc.py  # VOC's protocol
  python -m mixreorg_jax.segment --checkpoint=DIR --image=IMG --config=configs/eval/synthetic.py \
      --config.data.root=data/synthetic/voc  # class names from the set's class_names.txt

The picture has the image with the predicted classes painted over it and a legend, next to the raw groups (each
pixel coloured by its group). Without --classes it shows the image and the groups only. The protocol is the
evaluation's (mixreorg_jax/zeroshot.py): short side 448, 448 windows at stride 224, top-5 classes, and a
background class where no class reaches --bg_threshold (--nobackground turns it off).

From Python, `segment_image(model, image, class_names)` returns pixel-level class scores [C, H, W], the label
map and the group map, for downstream use.
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import os
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
from ml_collections import config_flags
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mixreorg_jax import inference
from mixreorg_jax import visualize
from mixreorg_jax import zeroshot
from mixreorg_jax.data import seg_datasets
from mixreorg_jax.data import tokenizers

BACKGROUND = "background"


def segment_image(model: inference.InferenceModel, image: np.ndarray, class_names: Optional[Sequence[str]] = None,
                  protocol: Optional[zeroshot.Protocol] = None, templates: Sequence[str] = ("a photo of a {}.",),
                  tokenizer=None) -> Dict[str, Any]:
  """Zero-shot segmentation of one image.

  Args:
    model: from inference.load.
    image: uint8 [H, W, 3] RGB.
    class_names: the classes to find; with protocol.with_background, label 0 is "background" (not prompted)
      and class_names[i] is label i + 1. None or empty: groups only.
    protocol: zeroshot.Protocol (default: short side 448, windows 448 / 224, top-5, no background).
    templates: prompt templates, averaged.
    tokenizer: default = the checkpoint's (its model_config.json tokenizer block).
  Returns:
    dict(logits float32 [C, H, W] or None, labels int32 [H, W] or None, groups int32 [H, W],
         class_names: the name of every label id).
  """
  protocol = protocol or zeroshot.Protocol(batch_size=1)
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"segment_image: expected an RGB image [H, W, 3], got shape {image.shape}.")
  class_names = tuple(class_names or ())
  if class_names:
    tokenizer = tokenizer or tokenizers.checkpoint_tokenizer(model.tokenizer)
    class_emb = zeroshot.class_embeddings(model.encode_text, tokenizer, class_names, templates)
    names = ((BACKGROUND,) if protocol.with_background else ()) + class_names
  else:  # the groups do not depend on the classes: one placeholder class, no text tower needed.
    class_emb = jnp.zeros((1, model.config.projection_dim), jnp.float32)
    protocol = zeroshot.Protocol(protocol.short_side, protocol.window, protocol.stride, 1, -1.0, False,
                                 protocol.batch_size)
    names = ()
  segmenter = zeroshot.SlidingWindowSegmenter(model.model, model.variables, class_emb, protocol,
                                              image_normalization=model.image_normalization)
  (_, logits, groups, _), = list(segmenter([("image", image)]))
  if not class_names:
    return dict(logits=None, labels=None, groups=groups, class_names=names)
  return dict(logits=logits, labels=zeroshot.predict(logits), groups=groups, class_names=names)


def render(image: np.ndarray, result: Dict[str, Any]) -> Image.Image:
  """The picture of a `segment_image` result: overlay + legend and groups, or image and groups."""
  groups = visualize.groups_panel(image, result["groups"])
  if result["labels"] is None:
    return visualize.side_by_side([image, groups], titles=("image", "groups"))
  overlay = visualize.overlay(image, result["labels"], result["class_names"])
  return visualize.side_by_side([overlay, groups], titles=("classes", "groups"))


def segment_file(checkpoint: str, image_path: str, class_names: Sequence[str], output: str = "",
                 protocol: Optional[zeroshot.Protocol] = None,
                 templates: Sequence[str] = ("a photo of a {}.",)) -> Tuple[str, Dict[str, Any]]:
  """The command: segments image_path with the checkpoint and writes the picture; -> (output path, result)."""
  if not os.path.isfile(image_path):
    raise FileNotFoundError(f"--image={image_path!r} does not exist.")
  image = seg_datasets.read_image(image_path)
  result = segment_image(inference.load(checkpoint), image, class_names, protocol, templates)
  output = output or os.path.splitext(image_path)[0] + "_segmented.png"
  render(image, result).save(output)
  return output, result


def config_class_names(config) -> Tuple[str, ...]:
  """An eval config's class names: config.class_names, else its dataset's own (which needs config.data.root)."""
  if config.class_names:
    return tuple(config.class_names)
  if not config.data.root:
    raise app.UsageError(f"--config: the {config.data.name} protocol takes its class names from the dataset; give "
                         "--classes or --config.data.root.")
  return seg_datasets.prompt_class_names(config, seg_datasets.from_config(config))


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that importing this module defines none."""
  flags.DEFINE_string("checkpoint", None, "An inference checkpoint directory.")
  flags.DEFINE_string("image", None, "The image file to segment.")
  flags.DEFINE_string("classes", "", "Comma-separated class names; '' = show the groups only.")
  flags.DEFINE_string("output", "", "The PNG to write; '' = <image name>_segmented.png next to it.")
  flags.DEFINE_bool("background", True, "Add a background class decided by --bg_threshold.")
  flags.DEFINE_float("bg_threshold", 0.95, "Background below this class score (VOC's 0.95).")
  flags.DEFINE_multi_string("template", ["a photo of a {}."], "Prompt template(s) with one {}.")
  flags.DEFINE_integer("short_side", 448, "Resize the short side to this (0 = native).")
  flags.DEFINE_integer("window", 448, "Sliding window size (0 = the whole image).")
  flags.DEFINE_integer("stride", 224, "Sliding window stride (0 = window).")
  config_flags.DEFINE_config_file("config", None, "An eval config (configs/eval/*.py): its protocol, prompt "
                                  "templates and (without --classes) class names instead of the flags above.",
                                  lock_config=True)
  flags.mark_flags_as_required(["checkpoint", "image"])


def main(argv):
  console.to_log_file(console.tool_log_path("segment"))
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  classes = [c.strip() for c in f.classes.split(",") if c.strip()]
  if f.config:  # the protocol of an evaluation.
    protocol, templates = zeroshot.Protocol.from_config(f.config), f.config.prompt_templates
    classes = classes or list(zeroshot.foreground_names(config_class_names(f.config), f.config.with_background))
  else:
    protocol = zeroshot.Protocol(short_side=f.short_side, window=f.window, stride=f.stride, top_k_classes=5,
                                 bg_threshold=f.bg_threshold if f.background else -1.0,
                                 with_background=f.background, batch_size=1)
    templates = f.template
  output, result = segment_file(f.checkpoint, f.image, classes, f.output, protocol, templates)
  if classes:
    print("classes found: " + ", ".join(result["class_names"][i] for i in np.unique(result["labels"])))
  print(f"wrote {output}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
