"""Zero-shot segmentation of the built-in synthetic set (data/synthetic/voc), as the demo evaluates it.

  python -m mixreorg_jax.evaluate --config=configs/eval/synthetic.py --checkpoint=DIR \
      --config.data.root=data/synthetic/voc

The voc_layout protocol with each 64 px image resized to SHORT_SIDE and segmented as one window, as GroupViT
evaluates VOC at a short side of 448 after pretraining at 224: the position embeddings are resized, so the model
sees its 8 px patches at a finer grid over the same picture. A model this small, trained for minutes, is far less
confident than GroupViT on VOC, so VOC's 0.95 calls every pixel background; thresholds and sizes are only ever
compared on the tuning split (data/synthetic/voc_val), never on the held-out one.
"""
from configs.eval import base_config, parse_arg

BG_THRESHOLD = 0.5  # between VOC's 0.95 and Context's 0.35; see the README on the demo
# Tuning split, the five demo runs of data version 3 (README, "What the demo reaches"): mIoU 30.3 at the native 64
# px, 32.3 at 96, 34.2 at 160, 34.9 at 192 (worst seed 28.2) and 35.0 at 256 (worst seed 27.8); 192 is the
# largest size at which both the mean and the worst seed still rose.
SHORT_SIDE = 192


def get_config(arg=None):
  templates, _ = parse_arg(arg)
  c = base_config("voc_layout", (), bg_threshold=BG_THRESHOLD, templates=templates)
  c.short_side = SHORT_SIDE
  c.window = c.stride = 0  # one window: the whole resized image.
  c.lock()
  return c
