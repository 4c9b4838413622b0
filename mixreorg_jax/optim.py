"""GroupViT's optimiser: AdamW, linear warm-up then cosine decay, global-norm clipping (all optax)."""
from typing import Callable, Tuple

import jax
import ml_collections
import optax

# Parameters that are never weight-decayed (besides every bias / norm / scalar, i.e. every leaf with ndim < 2).
NO_DECAY_NAMES = ("position_embedding", "group_token", "logit_scale")


def peak_learning_rate(optim_config: ml_collections.ConfigDict, batch_size: int) -> float:
  """GroupViT scales the learning rate linearly with the global batch: base_lr * batch / base_batch_size."""
  return optim_config.base_lr * batch_size / optim_config.base_batch_size


def learning_rate_schedule(optim_config: ml_collections.ConfigDict, batch_size: int,
                           total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate(optim_config, batch_size),
      warmup_steps=optim_config.warmup_steps, decay_steps=max(total_steps, optim_config.warmup_steps + 1),
      end_value=optim_config.min_lr)


def weight_decay_mask(params) -> dict:
  """True where weight decay applies: matrices and kernels, except position embeddings and group tokens."""
  def decays(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return leaf.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_config: ml_collections.ConfigDict, batch_size: int,
                   total_steps: int) -> Tuple[optax.GradientTransformation, Callable]:
  """-> (transformation, learning-rate schedule)."""
  schedule = learning_rate_schedule(optim_config, batch_size, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_config.clip_norm),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay, mask=weight_decay_mask))
  return tx, schedule
