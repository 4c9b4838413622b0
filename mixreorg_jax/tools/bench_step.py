r"""Benchmarks the GroupViT and the MixReorg train steps side by side (a benchmark, not a test).

  python -m mixreorg_jax.tools.bench_step --config=configs/demo.py
  python -m mixreorg_jax.tools.bench_step --config=configs/groupvit_gcc_yfcc.py --batch_size=8 --torch

Prints, for each step at the same model and batch: median step time after warm-up, the step's FLOPs from XLA's cost
analysis, the achieved GFLOP/s and its ratio to a large float32 matmul measured in the same process; with --torch,
also the transformers GroupViT train step (forward + backward + AdamW, CPU torch) at the same size.
"""
import functools
import time
from typing import Dict

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from mixreorg_jax import optim
from mixreorg_jax import sharding
from mixreorg_jax import train_step
from mixreorg_jax.models import groupvit

config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config.", lock_config=True)
flags.DEFINE_integer("batch_size", 0, "Global batch (0 = the config's).")
flags.DEFINE_integer("steps", 5, "Timed steps per variant (after one warm-up step).")
flags.DEFINE_bool("torch", False, "Also time the transformers GroupViT train step on CPU torch.")
FLAGS = flags.FLAGS


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """float32 GFLOP/s of an n x n matmul: the machine's practical peak for this dtype."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / np.median(times) / 1e9


def time_step(config: ml_collections.ConfigDict, steps: int) -> Dict[str, float]:
  """Median seconds per step and XLA's FLOP count of one step."""
  mesh = sharding.make_mesh(config.mesh)
  model = groupvit.GroupViT.from_config(config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.input.batch_size, config.total_steps)
  shardings = sharding.state_shardings(mesh, train_step.abstract_state(config, model, tx))
  state = train_step.jit_init_state(config, model, tx, shardings)(jax.random.key(0))
  batch = jax.device_put(train_step.example_batch(config, config.input.batch_size), sharding.batch_sharding(mesh))
  batch["text"] = batch["text"].at[:, -1].set(config.model.text.eot_id)
  t = time.perf_counter()
  compiled = train_step.jit_train_step(config, model, tx, schedule, mesh, shardings).lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return {"seconds": float(np.median(times)), "flops": flops, "compile_s": compile_s}


def time_torch_step(config: ml_collections.ConfigDict, steps: int) -> Dict[str, float]:
  """The transformers GroupViT train step (forward + backward + AdamW) at the same sizes, CPU torch float32."""
  import torch  # noqa: PLC0415  (optional, benchmark-only)
  import transformers  # noqa: PLC0415
  v, t, b = config.model.vision, config.model.text, config.input.batch_size
  hf_config = transformers.GroupViTConfig(
      projection_dim=config.model.projection_dim, projection_intermediate_dim=config.model.projection_hidden_dim,
      vision_config=dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), depths=list(v.depths),
                         num_group_tokens=list(v.num_group_tokens), num_output_groups=list(v.num_output_groups),
                         num_attention_heads=v.num_heads, image_size=config.input.image_size,
                         patch_size=v.patch_size),
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                       num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                       max_position_embeddings=t.context_length))
  model = transformers.GroupViTModel(hf_config).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
  pixels = torch.randn(b, 3, config.input.image_size, config.input.image_size)
  ids = torch.randint(0, t.vocab_size - 1, (b, config.input.context_length))
  ids[:, -1] = t.vocab_size - 1

  def step():
    opt.zero_grad()
    model(input_ids=ids, pixel_values=pixels, return_loss=True).loss.backward()
    opt.step()

  step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {"seconds": float(np.median(times))}


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.batch_size:
    config.input.batch_size = FLAGS.batch_size
  config.mesh.data, config.mesh.fsdp = -1, 1
  peak = matmul_gflops()
  rows = []
  for name, mixreorg in (("GroupViT", False), ("MixReorg", True)):
    variant = ml_collections.ConfigDict(config.to_dict())
    variant.model.mixreorg = mixreorg
    r = time_step(variant, FLAGS.steps)
    gflops = r["flops"] / r["seconds"] / 1e9
    rows.append((name, r["seconds"], r["flops"] / 1e9, gflops, gflops / peak, r["compile_s"]))
  print(f"\nbatch {config.input.batch_size}, {config.input.image_size} px, dtype {config.model.dtype}, "
        f"remat {config.model.remat}, {jax.device_count()} device(s); float32 matmul peak {peak:.1f} GFLOP/s\n")
  print("| step | s/step | GFLOP/step | GFLOP/s | of matmul peak | compile s |")
  print("|---|---|---|---|---|---|")
  for name, sec, gflop, rate, frac, comp in rows:
    print(f"| {name} | {sec:.3f} | {gflop:.1f} | {rate:.1f} | {frac:.0%} | {comp:.1f} |")
  (_, t_g, f_g, *_), (_, t_m, f_m, *_) = rows
  print(f"\nMixReorg/GroupViT: time {t_m / t_g:.2f}x, FLOPs {f_m / f_g:.2f}x, "
        f"time ratio over FLOP ratio {(t_m / t_g) / (f_m / f_g):.2f}")
  if FLAGS.torch:
    r = time_torch_step(config, FLAGS.steps)
    print(f"transformers GroupViT train step (CPU torch): {r['seconds']:.3f} s/step; "
          f"our GroupViT step is {r['seconds'] / t_g:.2f}x its speed")


if __name__ == "__main__":
  app.run(main)
