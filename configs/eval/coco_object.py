"""Zero-shot segmentation on COCO-Object val2017 (5000 images, 80 thing classes + background).

  python -m mixreorg_jax.evaluate --config=configs/eval/coco_object.py --checkpoint=DIR --config.data.root=PATH

PATH holds images/val2017/*.jpg (or val2017/*.jpg) and annotations/instances_val2017.json, whose polygons and
RLEs are rasterised here (stuff and unannotated pixels = background), or GroupViT's converted ground truth
annotations/val2017/*_instanceTrainIds.png (from COCO-Stuff; exactly GroupViT's protocol).
GroupViT's gcc_yfcc model reaches 24.3 mIoU here (its paper); MixReorg reports +2.5 over it.
Options after the colon: a template set (simple, subset, full).
"""
from configs.eval import base_config, parse_arg
from mixreorg_jax.data.seg_datasets import COCO_OBJECT_CLASSES

# The COCO category names in id order (the dataset constant, so the two cannot drift apart).
CLASS_NAMES = ("background",) + COCO_OBJECT_CLASSES
assert len(CLASS_NAMES) == 81


def get_config(arg=None):
  templates, _ = parse_arg(arg)
  # bg_threshold 0.95: GroupViT's code (segmentation/configs/_base_/datasets/coco.py).
  c = base_config("coco_object", CLASS_NAMES, bg_threshold=0.95, templates=templates, split="val2017")
  c.data.coco_crowd = "ignore"  # crowd regions: "ignore" (255), "class" (as COCO-Stuff) or "background".
  c.lock()
  return c
