"""MixReorg on GroupViT's gcc_yfcc_30e model: 30 epochs of GCC3M + GCC12M + YFCC14M at batch 4096.

  python -m mixreorg_jax.train --config=configs/mixreorg_gcc_yfcc.py --workdir=gs://BUCKET/mixreorg \
      --config.input.data_dir=gs://BUCKET/shards/*.tfrecord

Run it on a TPU pod with launch/tpu_pod.sh, or on GPU hosts with launch/slurm.sh. The MixReorg paper reports
+5.0 / +6.2 / +2.5 / +3.4 mIoU over GroupViT on PASCAL VOC / PASCAL Context / COCO-Object / ADE20K with this
model and data (arXiv 2308.04829).
"""
from configs import common

# GCC3M + GCC12M + YFCC14M: about 26 M image-text pairs (GroupViT's data after filtering).
NUM_EXAMPLES = 26_000_000
EPOCHS = 30


def get_config(arg=None):
  del arg
  c = common.base_config()
  steps_per_epoch = NUM_EXAMPLES // c.input.batch_size
  c.total_steps = EPOCHS * steps_per_epoch
  c.optim.warmup_steps = 2 * steps_per_epoch
  c.ckpt_steps = 2000
  c.log_steps = 100
  c.model.mixreorg = True
  c.eval.config = "configs/eval/voc.py"
  c.eval.every_steps = steps_per_epoch
  return c
