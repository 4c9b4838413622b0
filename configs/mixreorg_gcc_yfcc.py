"""MixReorg on GroupViT's gcc_yfcc_30e model: 30 epochs of GCC3M + GCC12M + YFCC14M at batch 4096.

  python -m mixreorg_jax.train --config=configs/mixreorg_gcc_yfcc.py --workdir=gs://BUCKET/mixreorg \
      --config.input.data_dir=gs://BUCKET/shards/*.tfrecord

Run it on a TPU pod with launch/tpu_pod.sh, or on GPU hosts with launch/slurm.sh. The MixReorg paper reports
+5.0 / +6.2 / +2.5 / +3.4 mIoU over GroupViT on PASCAL VOC / PASCAL Context / COCO-Object / ADE20K with this
model and data (arXiv 2308.04829). Add `--config.evals.<voc|context|coco_object|ade20k>.data.root=PATH` for the
zero-shot evaluations during training.
"""
from configs import common
from configs.eval import ade20k, coco_object, context, voc

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
  # The four benchmarks of the paper, every epoch; each is off until its data root is given, e.g.
  # --config.evals.voc.data.root=/data (configs/eval/<name>.py documents each layout).
  for name, eval_config in (("voc", voc), ("context", context), ("coco_object", coco_object), ("ade20k", ade20k)):
    c.evals[name] = eval_config.get_config()
    c.evals[name].every_steps = steps_per_epoch
  return c
