"""The GroupViT image tower: patch embedding, then stages of Transformer blocks that each end in a grouping block.

Stage i concatenates its S_i learned group tokens to the incoming tokens, runs depth_i blocks, splits the tokens
apart and merges the image tokens into num_output_groups[i] segment tokens. A stage with no group tokens (the last
one in GroupViT) is plain Transformer blocks. Stage i > 0 adds to its group tokens a (LayerNorm + token-MLP)
projection of the previous stage's group tokens.

The tower is split into methods (`embed`, `Stage.run_blocks`, `Stage.group`, `after_first_blocks`) so that the
MixReorg forward (`mixreorg_jax/mixreorg.py`) can interleave mixing with the first stage's blocks.
"""
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixreorg_jax.models import grouping
from mixreorg_jax.models import layers

Dtype = Any


class PatchEmbedding(nn.Module):
  """Conv (stride = kernel = patch) -> LayerNorm -> + position embedding (bicubic-resized for other sizes).

  [B, H, W, 3] -> ([B, N, C], (H / patch, W / patch)).
  """
  width: int
  patch_size: int
  pretrain_grid: int  # position embeddings are stored for a pretrain_grid x pretrain_grid patch grid.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=layers.DENSE_INIT, name="projection")(images)
    b, gh, gw, c = x.shape
    x = layers.layer_norm("layernorm")(x.reshape(b, gh * gw, c))
    pos = self.param("position_embeddings", nn.initializers.truncated_normal(0.02),
                     (1, self.pretrain_grid ** 2, self.width), jnp.float32)
    return x + resize_position_embeddings(pos, (gh, gw)).astype(x.dtype), (gh, gw)


def resize_position_embeddings(pos: jax.Array, grid: Tuple[int, int]) -> jax.Array:
  """[1, g*g, C] -> [1, gh*gw, C], bicubic as torch `interpolate(align_corners=False)` (GroupViT, transformers)."""
  g = int(round(pos.shape[1] ** 0.5))
  if (g, g) == tuple(grid):
    return pos
  wh = jnp.asarray(layers.torch_bicubic_matrix(g, grid[0]))
  ww = jnp.asarray(layers.torch_bicubic_matrix(g, grid[1]))
  grid_pos = pos.reshape(g, g, -1)
  out = jnp.einsum("oh,hwc,pw->opc", wh, grid_pos, ww, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(1, grid[0] * grid[1], -1)


class Stage(nn.Module):
  """One GroupViT stage (`GroupViTStage` in transformers)."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_group_tokens: int
  num_output_groups: int
  num_prev_group_tokens: int
  drop_path_rates: Sequence[float]
  assign_mlp_ratio: Sequence[float] = (0.5, 4.0)
  assign_eps: float = 1.0
  hard_assignment: bool = True
  gumbel: bool = True
  gumbel_tau: float = 1.0
  act: str = "gelu"
  remat: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    layer_cls = layers.encoder_layer_cls(self.remat)
    self.layers = [layer_cls(self.num_heads, self.mlp_dim, self.act, False, rate, self.dtype)
                   for rate in self.drop_path_rates]
    if self.num_group_tokens:
      self.group_token = self.param("group_token", nn.initializers.truncated_normal(0.02),
                                    (1, self.num_group_tokens, self.width), jnp.float32)
    if self.num_group_tokens and self.num_prev_group_tokens:
      self.group_projector_norm = layers.layer_norm()
      self.group_projector = layers.MixerMlp(self.width // 2, self.num_group_tokens, self.act,
                                             self.dtype)
    if self.num_group_tokens:
      self.downsample = grouping.GroupingBlock(
          self.num_heads, self.num_output_groups, self.mlp_dim, self.assign_mlp_ratio, self.assign_eps,
          self.hard_assignment, self.gumbel, self.gumbel_tau, self.act, self.dtype)

  def initial_group_tokens(self, batch: int, prev_group_tokens: Optional[jax.Array]) -> Optional[jax.Array]:
    """Learned group tokens [B, S, C] (+ projection of the previous stage's [B, S_prev, C])."""
    if not self.num_group_tokens:
      return None
    tokens = jnp.broadcast_to(self.group_token, (batch,) + self.group_token.shape[1:])
    if self.num_prev_group_tokens:
      tokens = tokens + self.group_projector(self.group_projector_norm(prev_group_tokens))
    return tokens

  def run_blocks(self, tokens: jax.Array, start: int, stop: int, train: bool) -> jax.Array:
    """Blocks [start, stop) of this stage on image+group tokens [B, N + S, C]."""
    for layer in self.layers[start:stop]:
      tokens = layer(tokens, train)
    return tokens

  def split(self, tokens: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    """[B, N + S, C] -> image tokens [B, N, C], group tokens [B, S, C]."""
    if not self.num_group_tokens:
      return tokens, None
    return tokens[:, :-self.num_group_tokens], tokens[:, -self.num_group_tokens:]

  def group(self, image_tokens, group_tokens, train: bool):
    """Grouping block: -> segments [B, S_out, C], Assignment [B, N, S_out] (None without group tokens)."""
    if not self.num_group_tokens:
      return image_tokens, None
    return self.downsample(image_tokens, group_tokens, train)

  def __call__(self, x, prev_group_tokens, train: bool = False):
    group_tokens = self.initial_group_tokens(x.shape[0], prev_group_tokens)
    tokens = x if group_tokens is None else jnp.concatenate([x, group_tokens.astype(x.dtype)], axis=1)
    x, group_tokens = self.split(self.run_blocks(tokens, 0, self.depth, train))
    segments, assignment = self.group(x, group_tokens, train)
    return segments, group_tokens, assignment


class VisionOutput(NamedTuple):
  """What the image tower returns."""
  segment_tokens: jax.Array  # [B, G, C], after the final LayerNorm; G = num_output_groups[-1].
  assignments: Tuple[grouping.Assignment, ...]  # per grouping stage, [B, N_in, S_out] each.
  grid: Tuple[int, int]  # (H / patch, W / patch), the patch grid of the input.


class GroupViTVision(nn.Module):
  """GroupViT image tower. images [B, H, W, 3] (normalised) -> VisionOutput."""
  width: int = 384
  num_heads: int = 6
  depths: Sequence[int] = (6, 3, 3)
  num_group_tokens: Sequence[int] = (64, 8, 0)
  num_output_groups: Sequence[int] = (64, 8, 8)
  patch_size: int = 16
  image_size: int = 224
  mlp_ratio: float = 4.0
  assign_mlp_ratio: Sequence[float] = (0.5, 4.0)
  assign_eps: float = 1.0
  hard_assignment: bool = True
  gumbel: bool = True
  gumbel_tau: float = 1.0
  drop_path_rate: float = 0.1
  act: str = "gelu"
  remat: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    if not (len(self.depths) == len(self.num_group_tokens) == len(self.num_output_groups)):
      raise ValueError(
          f"config.model.vision: depths {tuple(self.depths)}, num_group_tokens {tuple(self.num_group_tokens)} and "
          f"num_output_groups {tuple(self.num_output_groups)} must have one entry per stage.")
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()  # GroupViT: linear over depth.
    starts = np.cumsum([0] + list(self.depths)).tolist()
    self.embeddings = PatchEmbedding(self.width, self.patch_size, self.image_size // self.patch_size, self.dtype)
    self.stages = [
        Stage(self.width, depth, self.num_heads, int(self.width * self.mlp_ratio), self.num_group_tokens[i],
              self.num_output_groups[i], self.num_output_groups[i - 1] if i else 0,
              tuple(rates[starts[i]:starts[i + 1]]), tuple(self.assign_mlp_ratio), self.assign_eps,
              self.hard_assignment, self.gumbel, self.gumbel_tau, self.act, self.remat, self.dtype,
              name=f"stages_{i}")
        for i, depth in enumerate(self.depths)]
    self.layernorm = layers.layer_norm()

  def embed(self, images):
    """[B, H, W, 3] -> patch tokens [B, N, C], grid."""
    return self.embeddings(images.astype(self.dtype))

  def after_first_blocks(self, x, group_tokens, train: bool = False):
    """From the end of stage 1's blocks to the output: grouping block 1, then the remaining stages.

    x: image tokens [B, N, C]; group_tokens: stage-1 group tokens [B, S_1, C]. Returns (segments [B, G, C],
    assignments). This is the part that MixReorg runs on the original, mixed and restored features at once.
    """
    segments, assignment = self.stages[0].group(x, group_tokens, train)
    assignments = [assignment] if assignment is not None else []
    for stage in self.stages[1:]:
      segments, group_tokens, assignment = stage(segments, group_tokens, train)
      if assignment is not None:
        assignments.append(assignment)
    return self.layernorm(segments), tuple(assignments)

  def first_stage_tokens(self, x):
    """Image tokens [B, N, C] with stage 1's learned group tokens appended: [B, N + S_1, C]."""
    group_tokens = self.stages[0].initial_group_tokens(x.shape[0], None)
    return x if group_tokens is None else jnp.concatenate([x, group_tokens.astype(x.dtype)], axis=1)

  def __call__(self, images, train: bool = False) -> VisionOutput:
    x, grid = self.embed(images)
    first = self.stages[0]
    x, group_tokens = first.split(first.run_blocks(self.first_stage_tokens(x), 0, first.depth, train))
    segments, assignments = self.after_first_blocks(x, group_tokens, train)
    return VisionOutput(segments, assignments, grid)
