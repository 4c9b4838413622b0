"""Evaluation throughput: our jitted zero-shot window step vs the transformers GroupViT forward (torch CPU).

  python -m mixreorg_jax.tools.bench_eval [--sizes=224,448 --batch_size=2 --iters=3 --classes=21] \
      [--config=configs/groupvit_gcc_yfcc.py]

Both models have GroupViT's gcc_yfcc architecture (--config, by default configs/groupvit_gcc_yfcc.py;
transformers' GroupViTConfig defaults) with random weights. For each resolution it times images/s of
  * ours: zeroshot.make_window_fn, i.e. the image tower, chained soft assignments, pixel-level class scores of
    `classes` classes with top-5 and background (everything the protocol does per window), jitted;
  * transformers: GroupViTModel.vision_model + visual_projection with output_attentions (the tensors the
    protocol needs; no pixel scores), under torch.no_grad on CPU.
The first call (compilation for ours) is excluded; the table also gives our compile time.
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mixreorg_jax import optional_deps
from mixreorg_jax import zeroshot
from mixreorg_jax.models import groupvit


def _rate(fn, batch_size: int, iters: int) -> float:
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return batch_size * iters / (time.perf_counter() - start)


def bench_ours(c, size: int, batch_size: int, iters: int, num_classes: int):
  """-> (images/s, first-call seconds) of the jitted window step of the model of config.model `c` at size x size."""
  model = groupvit.GroupViT.from_config(c)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, c.vision.image_size, c.vision.image_size, 3)),
                                  jnp.zeros((1, c.text.context_length), jnp.int32))
  protocol = zeroshot.Protocol(bg_threshold=0.95, with_background=True, batch_size=batch_size)
  window_fn = zeroshot.make_window_fn(model, protocol)
  rng = np.random.default_rng(0)
  class_emb = groupvit.l2_normalize(jnp.asarray(rng.normal(size=(num_classes, c.projection_dim))))
  images = jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32)
  key = jax.random.key(0)
  start = time.perf_counter()
  jax.block_until_ready(window_fn(variables, images, class_emb, key))
  first = time.perf_counter() - start
  return _rate(lambda: jax.block_until_ready(window_fn(variables, images, class_emb, key)), batch_size, iters), first


def bench_transformers(size: int, batch_size: int, iters: int) -> float:
  """-> images/s of transformers' GroupViT image tower + projection with attentions at size x size."""
  torch = optional_deps.require("torch", "The transformers comparison of bench_eval")
  transformers = optional_deps.require("transformers", "The transformers comparison of bench_eval")
  # Its vision tower cannot interpolate position embeddings; a config at `size` costs the same compute.
  model = transformers.GroupViTModel(transformers.GroupViTConfig(vision_config=dict(image_size=size))).eval()
  pixels = torch.randn(batch_size, 3, size, size)

  def forward():
    with torch.no_grad():
      out = model.vision_model(pixel_values=pixels, output_attentions=True)
      model.visual_projection(out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1]))

  forward()
  return _rate(forward, batch_size, iters)


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file("config", "configs/groupvit_gcc_yfcc.py", "The train config whose model is timed.",
                                  lock_config=True)
  flags.DEFINE_list("sizes", ["224", "448"], "Image sizes.")
  flags.DEFINE_integer("batch_size", 2, "Windows per call.")
  flags.DEFINE_integer("iters", 3, "Timed calls.")
  flags.DEFINE_integer("classes", 21, "Classes scored.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  rows = []
  for size in [int(s) for s in args.sizes]:
    ours, compile_s = bench_ours(args.config.model, size, args.batch_size, args.iters, args.classes)
    theirs = bench_transformers(size, args.batch_size, args.iters)
    rows.append((size, ours, theirs, compile_s))
  print(f"batch {args.batch_size}, {args.iters} timed calls, {jax.device_count()} {jax.default_backend()} device(s)")
  print(f"{'size':>5}  {'ours img/s':>11}  {'transformers img/s':>19}  {'ratio':>6}  {'our compile s':>13}")
  for size, ours, theirs, compile_s in rows:
    print(f"{size:>5}  {ours:>11.2f}  {theirs:>19.2f}  {ours / theirs:>6.2f}  {compile_s:>13.1f}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
