"""Zero-shot segmentation on any folder in VOC layout, e.g. the synthetic set (data/synthetic/voc).

  python -m mixreorg_jax.evaluate --config=configs/eval/voc_layout.py --checkpoint=DIR --config.data.root=PATH

PATH holds JPEGImages/*.jpg, SegmentationClass/*.png (palette PNGs of class ids, 255 = ignore),
ImageSets/Segmentation/val.txt and class_names.txt (one name per line, line 0 = background); the class names are
read from that file at evaluation time (class_names stays empty here).
Options after the colon: a template set (simple, subset, full).
"""
from configs.eval import base_config, parse_arg


def get_config(arg=None):
  templates, _ = parse_arg(arg)
  # 0.95 as for VOC; the synthetic set's objects sit on textured backgrounds like VOC's.
  c = base_config("voc_layout", (), bg_threshold=0.95, templates=templates)
  c.lock()
  return c
