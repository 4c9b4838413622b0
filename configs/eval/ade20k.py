"""Zero-shot segmentation on ADE20K val (2000 images, 150 classes, no background class).

  python -m mixreorg_jax.evaluate --config=configs/eval/ade20k.py --checkpoint=DIR --config.data.root=PATH

PATH holds ADEChallengeData2016/{images,annotations}/validation (label 0 = "other" is ignored, 1..150 are the
classes). With `configs/eval/ade20k.py:tfds`, PATH is a TFDS data_dir where scene_parse150 is prepared ("" = the
TFDS default). ADE20K has no background class, so there is no background threshold (bg_threshold = -1).
MixReorg reports +3.4 mIoU over GroupViT here (its paper).
Options after the colon, comma-separated: a template set (simple, subset, full) and `tfds`.
"""
from configs.eval import base_config, parse_arg
from mixreorg_jax.data.seg_datasets import ADE20K_CLASSES


def get_config(arg=None):
  templates, options = parse_arg(arg, allowed=("tfds",))
  name = "scene_parse150" if "tfds" in options else "ade20k"
  c = base_config(name, ADE20K_CLASSES, bg_threshold=-1.0, with_background=False, templates=templates,
                  split="validation")
  c.lock()
  return c
