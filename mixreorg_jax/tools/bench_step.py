r"""Benchmarks the GroupViT and the MixReorg train steps side by side (a benchmark, not a test).

  python -m mixreorg_jax.tools.bench_step --config=configs/demo.py
  python -m mixreorg_jax.tools.bench_step --config=configs/groupvit_gcc_yfcc.py --batch_size=8 --torch

Prints, for each step at the same model and batch: median step time after warm-up, the step's FLOPs from XLA's cost
analysis, the achieved GFLOP/s and its ratio to a large float32 matmul measured in the same process; with --torch,
also the transformers GroupViT train step (forward + backward + AdamW, CPU torch) at the same size. All of them are
timed in interleaved rounds, so the ratios hold on a machine whose load changes. The table also gives each
step's minor page faults: XLA CPU allocates a step's temporaries (1.2 GB for the reference model at batch 8) afresh
on every call, and with 4 KiB pages the kernel maps and zeroes each of them again. Run with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (what `launch/local_cpu.sh` and the Makefile set) to back them with
huge pages.
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import os
import resource
import time
from typing import Callable, Dict, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from mixreorg_jax import optim
from mixreorg_jax import optional_deps
from mixreorg_jax import sharding
from mixreorg_jax import train_step
from mixreorg_jax.models import groupvit

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (bench_micro_batch's too); defined only when it runs."""
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config.", lock_config=True)
  flags.DEFINE_integer("batch_size", 0, "Global batch (0 = the config's).")
  flags.DEFINE_integer("rounds", 3, "Interleaved rounds; each runs every variant in turn.")
  flags.DEFINE_integer("steps", 3, "Timed steps per variant and round (after one untimed step).")
  flags.DEFINE_bool("torch", False, "Also time the transformers GroupViT train step on CPU torch.")

HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"  # in GLIBC_TUNABLES: malloc backs large blocks with huge pages


def timed(fn: Callable[[], object]) -> float:
  """Seconds one call of `fn` takes, its result waited for."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def matmul_step(n: int = 2048) -> Tuple[Callable[[], object], float]:
  """A compiled float32 n x n matmul and its FLOPs: the machine's practical peak for this dtype."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  return lambda: f(a), 2.0 * n ** 3


def train_step_fn(config: ml_collections.ConfigDict) -> Tuple[Callable[[], object], float, float]:
  """One compiled train step as a no-argument callable (it carries its own state), its XLA FLOP count and the
  compile seconds. The step has been run once (warm-up)."""
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
  carry = {"state": state}

  def step():
    carry["state"], metrics = compiled(carry["state"], batch)
    return metrics

  jax.block_until_ready(step())
  return step, flops, compile_s


def torch_step_fn(config: ml_collections.ConfigDict) -> Callable[[], None]:
  """The transformers GroupViT train step (forward + backward + AdamW) at the same sizes, CPU torch float32, as a
  no-argument callable, run once (warm-up)."""
  torch = optional_deps.require("torch", "The transformers comparison of bench_step")
  transformers = optional_deps.require("transformers", "The transformers comparison of bench_step")
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
  return step


def minor_page_faults() -> int:
  """This process's minor page faults so far: pages the kernel had to map (and zero) on first touch."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_medians(fns: Dict[str, Callable[[], object]], rounds: int,
                        calls: int) -> Tuple[Dict[str, float], Dict[str, float]]:
  """Median seconds per call of each function over `rounds` interleaved rounds, so that a change in machine load
  affects all of them alike, and its mean minor page faults per timed call. In a round each function runs one
  untimed call, then `calls` timed ones: the untimed call absorbs what switching from the previous function costs
  (re-allocated buffers, other runtimes' idle threads still spinning)."""
  times = {name: [] for name in fns}
  faults = dict.fromkeys(fns, 0)
  for _ in range(rounds):
    for name, fn in fns.items():
      timed(fn)
      before = minor_page_faults()
      times[name].extend(timed(fn) for _ in range(calls))
      faults[name] += minor_page_faults() - before
  return ({name: float(np.median(t)) for name, t in times.items()},
          {name: f / (rounds * calls) for name, f in faults.items()})


def huge_page_malloc() -> bool:
  """Whether glibc malloc was told to back its large blocks with transparent huge pages."""
  return HUGE_PAGE_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def flag_config() -> ml_collections.ConfigDict:
  """--config with --batch_size applied, on a data-parallel mesh of every device (what the benchmarks step)."""
  config = FLAGS.config
  if FLAGS.batch_size:
    config.input.batch_size = FLAGS.batch_size
  config.mesh.data, config.mesh.fsdp = -1, 1
  return config


def main(argv):
  console.to_log_file(console.tool_log_path("bench_step"))
  del argv
  config = flag_config()
  fns, flops, compile_s = {}, {}, {}
  fns["matmul"], flops["matmul"] = matmul_step()
  for name, mixreorg in (("GroupViT", False), ("MixReorg", True)):
    variant = ml_collections.ConfigDict(config.to_dict())
    variant.model.mixreorg = mixreorg
    fns[name], flops[name], compile_s[name] = train_step_fn(variant)
  if FLAGS.torch:
    fns["torch"] = torch_step_fn(config)
  seconds, faults = interleaved_medians(fns, FLAGS.rounds, FLAGS.steps)
  peak = flops["matmul"] / seconds["matmul"] / 1e9
  print(f"\nbatch {config.input.batch_size}, {config.input.image_size} px, dtype {config.model.dtype}, "
        f"remat {config.model.remat}, {jax.device_count()} device(s); float32 matmul peak {peak:.1f} GFLOP/s; "
        f"medians over {FLAGS.rounds} interleaved rounds of {FLAGS.steps} steps; huge-page malloc "
        f"{'on' if huge_page_malloc() else f'off (set GLIBC_TUNABLES={HUGE_PAGE_TUNABLE})'}\n")
  print("| step | s/step | GFLOP/step | GFLOP/s | of matmul peak | page faults/step | compile s |")
  print("|---|---|---|---|---|---|---|")
  for name in ("GroupViT", "MixReorg"):
    rate = flops[name] / seconds[name] / 1e9
    print(f"| {name} | {seconds[name]:.3f} | {flops[name] / 1e9:.1f} | {rate:.1f} | {rate / peak:.0%} | "
          f"{faults[name]:,.0f} | {compile_s[name]:.1f} |")
  time_ratio = seconds["MixReorg"] / seconds["GroupViT"]
  flop_ratio = flops["MixReorg"] / flops["GroupViT"]
  print(f"\nMixReorg/GroupViT: time {time_ratio:.2f}x, FLOPs {flop_ratio:.2f}x, "
        f"time ratio over FLOP ratio {time_ratio / flop_ratio:.2f}")
  if FLAGS.torch:
    print(f"transformers GroupViT train step (CPU torch): {seconds['torch']:.3f} s/step; "
          f"our GroupViT step is {seconds['torch'] / seconds['GroupViT']:.2f}x its speed "
          f"({faults['torch']:,.0f} page faults/step)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
