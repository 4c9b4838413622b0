"""Small shared fixtures for the tests: a tiny model config and a synthetic batch."""
from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import numpy as np

from configs import demo


def tiny_config(**overrides):
  """A few-thousand-parameter MixReorg config (32 px, 16 patches) that compiles and steps in seconds."""
  c = demo.get_config()
  c.input.batch_size = 16
  c.input.image_size = 32
  c.input.context_length = 8
  # Without the noun prompts unless a test asks for them (tests/test_train_step.py runs that path).
  c.model.multi_label, c.input.num_nouns, c.input.noun_context_length = False, 0, 0
  c.loss.w_noun_seg = c.loss.w_segment_nouns = 0.0
  c.loss.seg_targets = "caption"  # the noun-prompt target of the demo needs the prompts, off here.
  v = c.model.vision
  v.width, v.num_heads, v.depths, v.patch_size, v.image_size = 32, 2, (2, 1, 1), 8, 32
  v.num_group_tokens, v.num_output_groups = (8, 4, 0), (8, 4, 4)
  v.gumbel = True  # GroupViT's default, so the step tests cover the Gumbel stream (the demo turns it off).
  t = c.model.text
  t.vocab_size, t.width, t.num_layers, t.num_heads, t.mlp_dim, t.context_length, t.eot_id = 64, 32, 1, 2, 64, 8, 2
  c.model.projection_dim, c.model.projection_hidden_dim = 16, 32
  c.mix.context_layers = 1
  c.optim.warmup_steps = 5
  c.total_steps = 200
  for key, value in overrides.items():
    node = c
    *parents, name = key.split(".")
    for p in parents:
      node = node[p]
    node[name] = value
  return c


def random_batch(config, seed=0, batch_size=None):
  """A batch of random images and distinct random captions ending in the eot token."""
  b = batch_size or config.input.batch_size
  rng = np.random.default_rng(seed)
  size, length = config.input.image_size, config.input.context_length
  t = config.model.text
  text = rng.integers(3, t.vocab_size, (b, length)).astype(np.int32)
  lengths = rng.integers(2, length, b)
  text[np.arange(b), lengths] = t.eot_id
  text[np.arange(length)[None, :] > lengths[:, None]] = 0
  batch = {"image": rng.normal(size=(b, size, size, 3)).astype(np.float32), "text": text}
  if config.model.multi_label:
    batch["nouns"] = np.stack([text] * config.input.num_nouns, axis=1)
  return jax.tree.map(jnp.asarray, batch)


_TOOL_FLAGS = {"tool": None, "names": set()}  # the command whose flags are defined now, and their names.


def run_tool_main(tool, **values):
  """A command's main() in-process with these flag values. Its flags (tool.define_flags) replace those of the
  command run before, since commands share names such as --output."""
  if _TOOL_FLAGS["tool"] is not tool:
    for name in _TOOL_FLAGS["names"]:
      delattr(flags.FLAGS, name)
    before = set(flags.FLAGS)
    tool.define_flags()
    _TOOL_FLAGS.update(tool=tool, names=set(flags.FLAGS) - before)
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**values):
    tool.main([""])
