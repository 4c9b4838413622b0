"""Defaults shared by every training config: the GroupViT gcc_yfcc reference model and its optimiser.

Each experiment config starts from `base_config()` and changes what differs; every key is listed here once, so
a typo in `--config.some.key=...` is an error (the configs are locked).
"""

import ml_collections

from mixreorg_jax.models import reference


def base_config() -> ml_collections.ConfigDict:
  """GroupViT's official gcc_yfcc_30e model and optimiser, with MixReorg's settings (DESIGN.md)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 10_000
  c.log_steps = 50
  c.ckpt_steps = 1000
  c.keep_ckpts = 3
  c.max_skipped_steps = 10  # halt after this many consecutive non-finite updates.
  c.profile_steps = 0  # > 0: write a profiler trace of this many steps after the first log_steps.
  c.debug_nan_step = -1  # test hook: >= 0 poisons the gradients from this step on (NaN guard tests) ...
  c.debug_nan_steps = 1  # ... for this many steps.
  # Several processes: when no process's loop has moved for this long, the ones at the earliest step are taken for
  # hung and every process stops (status 75, as for a lost one); the first step after a (re)start, saves,
  # evaluations and the periodic hooks (profile) may take peer_timeout_long_seconds.
  c.peer_timeout_seconds = 20
  c.peer_timeout_long_seconds = 1800
  c.debug_hang = ""  # test hook: "PROCESS:STEP" hangs that process at STEP (total_steps + 1: after the final
  # evaluation), its threads still running.
  c.debug_save_fault = ""  # test hook: "kill:STEP" SIGKILLs the run mid-save of STEP, "enospc:STEP" fails it.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices.

  c.input = ml_collections.ConfigDict()
  c.input.batch_size = 4096  # global, across all hosts; GroupViT#28/#42: 4096 is what reproduces.
  # > 0: the towers run this many examples (over all devices) at a time, and the step is still exactly the one of
  # the whole batch (gradient caching, train_step.micro_batched_grads); 0 = the whole batch at once.
  c.input.micro_batch_size = 0
  c.input.image_size = 224
  c.input.data_dir = ""  # a TFRecord directory or glob; "" = the built-in synthetic data.
  c.input.synthetic_dir = "data/synthetic"
  # Of the built-in data's training captions, the share that describes the background (data.synthetic's
  # SCENE_TEMPLATES); -1: every template equally often (5 in 14). Use another synthetic_dir for another share.
  c.input.synthetic_scene_share = -1.0
  c.input.datasets = ()  # optional weighted mixture, see mixreorg_jax/data/input_pipeline.py.
  c.input.image_key = "jpg"
  c.input.text_key = "txt"
  c.input.nouns_key = "nouns"
  c.input.tokenizer = "clip_bpe"
  c.input.tokenizer_path = ""  # "" = the cached CLIP vocab (python -m mixreorg_jax.tools.clip_vocab).
  c.input.context_length = 77
  c.input.num_nouns = 3  # GroupViT's multi-label loss: up to 3 nouns per caption; 0 disables.
  c.input.prompt_templates = ("a photo of a {}.",)
  c.input.noun_context_length = 0  # tokens of a noun prompt (0 = input.context_length); prompts are short.
  c.input.shuffle_buffer = 10_000
  c.input.crop_scale = (0.08, 1.0)
  c.input.color_jitter = 0.0
  c.input.normalization = "clip"  # pixel statistics, "clip" or "imagenet"; exported checkpoints record it.
  c.input.seed = 0
  c.input.deterministic = True  # same batches in the same order under input.seed (exact resume needs it).
  c.input.num_parallel_calls = -1  # tf.data.AUTOTUNE
  c.input.expected_num_examples = 0  # > 0: checked against the shards' count (GroupViT#43/#46).

  c.model = reference.reference_model_config()

  c.mix = ml_collections.ConfigDict(dict(group_size=2, context_layers=3, progressive_weight=0.5))
  # w_group_info (not in the paper; 0 = off) rewards the token-group mutual information of the grouping blocks.
  # seg_negatives: the captions L_seg contrasts a mixed patch against: "group" (the K source captions of its
  # mixing group, DESIGN.md) or "batch" (every caption of the global batch; not in the paper).
  # seg_targets: what a mixed segment is matched with in L_seg: "caption" (its source's caption, DESIGN.md) or
  # "nouns" (the best of its source's noun prompts; not in the paper, needs model.multi_label).
  # w_noun_seg (not in the paper; 0 = off, needs model.multi_label): every caption noun matched by one segment of
  # its image (losses.noun_segment_loss). w_segment_nouns (not in the paper; 0 = off, needs model.multi_label):
  # each image's segments nearer its own nouns than the batch's other nouns (losses.segment_noun_loss).
  # w_segment_naming (not in the paper; 0 = off, needs model.multi_label): the best segment for each caption noun
  # named by it over the batch's other nouns (losses.segment_naming_loss). w_prompt_uniformity (not in the paper;
  # 0 = off, needs model.multi_label): spreads the batch's different noun prompts apart (losses.prompt_uniformity).
  # w_source_nouns (not in the paper; 0 = off, needs model.multi_label): in each mixed image, every noun of its
  # sources found best by a segment of its own source (losses.source_noun_loss).
  c.loss = ml_collections.ConfigDict(dict(w_rest=1.0, w_seg=1.0, w_group_info=0.0, seg_negatives="group",
                                          seg_targets="caption", w_noun_seg=0.0, w_segment_nouns=0.0,
                                          w_segment_naming=0.0, w_prompt_uniformity=0.0, w_source_nouns=0.0))

  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1.6e-3, base_batch_size=4096,  # lr = base_lr * batch_size / base_batch_size (GroupViT).
      min_lr=4e-5, warmup_steps=1000, weight_decay=0.05, clip_norm=5.0, b1=0.9, b2=0.999, eps=1e-8,
      # Not in the paper or GroupViT (0 = off): evaluations and exports use an exponential moving average of the
      # parameters with this decay (train_step.ema_decay_at ramps it up over the first steps).
      ema_decay=0.0))

  # Zero-shot evaluations by name, each an eval config (configs/eval/*.py) with its period: logged as
  # eval/<name>/..., outputs in WORKDIR/eval/<name>/. An evaluation is on when it has data (data.root or synthetic).
  c.evals = ml_collections.ConfigDict()
  return c
