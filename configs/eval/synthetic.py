"""Zero-shot segmentation of the built-in synthetic set (data/synthetic/voc), as the demo evaluates it.

  python -m mixreorg_jax.evaluate --config=configs/eval/synthetic.py --checkpoint=DIR \
      --config.data.root=data/synthetic/voc

The voc_layout protocol at the images' native 64 px (no resize, one window). A model this small, trained for
minutes, is far less confident than GroupViT on VOC, so VOC's 0.95 calls every pixel background; thresholds are
only ever compared on the tuning split (data/synthetic/voc_val), never on the held-out one.
"""
from configs.eval import base_config, parse_arg

BG_THRESHOLD = 0.5  # between VOC's 0.95 and Context's 0.35; see the README on the demo


def get_config(arg=None):
  templates, _ = parse_arg(arg)
  c = base_config("voc_layout", (), bg_threshold=BG_THRESHOLD, templates=templates)
  c.short_side = c.window = c.stride = 0  # native size: the synthetic images are 64 px, as in pretraining.
  c.lock()
  return c
