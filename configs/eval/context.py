"""Zero-shot segmentation on PASCAL Context val (5105 images): 59 classes + background = 60 classes.

  python -m mixreorg_jax.evaluate --config=configs/eval/context.py --checkpoint=DIR --config.data.root=PATH

PATH holds VOCdevkit/VOC2010 with JPEGImages, SegmentationClassContext/*.png (0 = background, 1..59, as the
standard conversion of trainval_merged.json writes them) and ImageSets/SegmentationContext/val.txt.
GroupViT's gcc_yfcc model reaches 22.4 mIoU here (its paper); MixReorg reports +6.2 over it.

Context-59 vs Context-60: GroupViT and MixReorg evaluate 60 classes (background is a class, decided by the
threshold). `--config.with_background=False` gives the 59-class protocol instead (background pixels ignored,
no threshold); the two are not comparable.
Options after the colon: a template set (simple, subset, full).
Full labels instead of the converted PNGs: --config.data.context_full_labels=trainval (a folder, relative to
VOC2010 or absolute, of the release's <name>.mat) and optionally --config.data.context_labels_txt=.../labels.txt.
"""
from configs.eval import base_config, parse_arg

# GroupViT's prompt names (segmentation/datasets/pascal_context.py), in label-id order.
CLASS_NAMES = (
    "background", "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "plant", "road", "rock", "sheep", "shelves", "sidewalk",
    "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "monitor", "wall", "water", "window",
    "wood")
assert len(CLASS_NAMES) == 60


def get_config(arg=None):
  templates, _ = parse_arg(arg)
  # bg_threshold: GroupViT's code uses 0.35 for Context, its paper says 0.5 (NVlabs/GroupViT#56); we use the code's.
  c = base_config("context", CLASS_NAMES, bg_threshold=0.35, templates=templates)
  c.data.context_full_labels = ""  # "" = SegmentationClassContext PNGs; else the release's full-label folder.
  c.data.context_labels_txt = ""  # labels.txt of the release ("" = the built-in 459-class ids).
  c.lock()
  return c
