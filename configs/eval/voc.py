"""Zero-shot segmentation on PASCAL VOC 2012 val (1449 images, 20 classes + background).

  python -m mixreorg_jax.evaluate --config=configs/eval/voc.py --checkpoint=DIR --config.data.root=PATH

PATH holds VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt). GroupViT's
gcc_yfcc checkpoint reaches 52.3 mIoU here (its README); MixReorg reports +5.0 over it.
Options after the colon: a template set, `simple` (default), `subset` or `full` (80 prompts).
"""
from configs.eval import base_config, parse_arg

# GroupViT's prompt names (segmentation/datasets/pascal_voc.py): "table", "plant", "monitor" instead of the
# VOC spellings "diningtable", "pottedplant", "tvmonitor". Index = label id; "background" is never prompted.
CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "table", "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor")


def get_config(arg=None):
  templates, _ = parse_arg(arg)
  # bg_threshold: GroupViT's code uses 0.95 for VOC, its paper says 0.9 (NVlabs/GroupViT#56); we use the code's.
  c = base_config("voc", CLASS_NAMES, bg_threshold=0.95, templates=templates)
  c.lock()
  return c
