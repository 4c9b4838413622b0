"""Zero-shot segmentation of the built-in synthetic set (data/synthetic/voc), as the demo evaluates it.

  python -m mixreorg_jax.evaluate --config=configs/eval/synthetic.py --checkpoint=DIR \
      --config.data.root=data/synthetic/voc

The voc_layout protocol at the images' native 64 px (no resize, one window) with a background threshold chosen
on the tuning split (data/synthetic/voc_val), never on the held-out one: a model this small, trained for minutes,
is far less confident than GroupViT on VOC, so VOC's 0.95 would call every pixel background.
"""
from configs.eval import base_config, parse_arg

BG_THRESHOLD = 0.5  # tuned on voc_val


def get_config(arg=None):
  templates, _ = parse_arg(arg)
  c = base_config("voc_layout", (), bg_threshold=BG_THRESHOLD, templates=templates)
  c.short_side = c.window = c.stride = 0  # native size: the synthetic images are 64 px, as in pretraining.
  c.lock()
  return c
