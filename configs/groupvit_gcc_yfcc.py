"""The GroupViT baseline (gcc_yfcc_30e): MixReorg's model, data and schedule without the mixing branches.

  python -m mixreorg_jax.train --config=configs/groupvit_gcc_yfcc.py --workdir=gs://BUCKET/groupvit \
      --config.input.data_dir=gs://BUCKET/shards/*.tfrecord

GroupViT's released gcc_yfcc checkpoint is reported at 52.3 VOC mIoU in the NVlabs/GroupViT README.
"""
from configs import mixreorg_gcc_yfcc


def get_config(arg=None):
  c = mixreorg_gcc_yfcc.get_config(arg)
  c.model.mixreorg = False
  return c
