r"""Memory and time of the micro-batched train step against the one-shot step (a benchmark, not a test).

  # memory only (compiles, never runs): the reference model at global batch 256
  python -m mixreorg_jax.tools.bench_micro_batch --config=configs/mixreorg_gcc_yfcc.py --batch_size=256 \
      --micro_batch_sizes=8,16,32 --rounds=0
  # memory and time, where the one-shot step fits and runs in reasonable time
  python -m mixreorg_jax.tools.bench_micro_batch --config=configs/demo.py --batch_size=256 --micro_batch_sizes=32

For the one-shot step and each micro-batch size, at the same global batch: XLA's memory analysis of the compiled
step (`compiled.memory_analysis()`: temporaries, arguments, outputs, and the peak as arguments + outputs - aliased
(the donated state) + temporaries), the compile seconds, and with --rounds > 0 the median step time over
interleaved rounds (tools/bench_step.py). Every step is the same one, exactly (tests/test_train_step.py).
"""
import time
from typing import Dict

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from mixreorg_jax import optim
from mixreorg_jax import sharding
from mixreorg_jax import train_step
from mixreorg_jax.models import groupvit
from mixreorg_jax.tools import bench_step

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs. --config, --batch_size, --rounds (0 = memory analysis
  only: nothing runs) and --steps are bench_step's."""
  bench_step.define_flags()
  flags.DEFINE_list("micro_batch_sizes", ["8", "16", "32"], "Micro-batch sizes to compare with the one-shot step.")
  flags.DEFINE_bool("memory", True, "Compile against abstract inputs for XLA's memory analysis (timing compiles "
                    "again, so --nomemory halves the compile time of a timing run).")

GB = 1e9


def compiled_memory(config: ml_collections.ConfigDict) -> Dict[str, float]:
  """Lowers and compiles the train step against abstract inputs (nothing is allocated or run).

  -> GB of temporaries, arguments, outputs, aliased (donated) bytes, the peak, and the compile seconds.
  """
  mesh = sharding.make_mesh(config.mesh)
  train_step.check_batch(config, mesh)
  model = groupvit.GroupViT.from_config(config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.input.batch_size, config.total_steps)
  abstract = train_step.abstract_state(config, model, tx)
  shardings = sharding.state_shardings(mesh, abstract)
  t = time.perf_counter()
  compiled = train_step.jit_train_step(config, model, tx, schedule, mesh, shardings).lower(
      train_step.sharded_abstract_state(abstract, shardings), train_step.abstract_batch(config, mesh)).compile()
  compile_s = time.perf_counter() - t
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return {"temp": m.temp_size_in_bytes / GB, "arguments": m.argument_size_in_bytes / GB,
          "outputs": m.output_size_in_bytes / GB, "aliased": m.alias_size_in_bytes / GB, "peak": peak / GB,
          "compile_s": compile_s}


def main(argv):
  del argv
  config = bench_step.flag_config()
  sizes = [0] + [int(s) for s in FLAGS.micro_batch_sizes]
  variants = {}
  for size in sizes:
    variant = ml_collections.ConfigDict(config.to_dict())
    variant.input.micro_batch_size = size
    variants[size] = variant
  memory = {}
  for size, variant in variants.items() if FLAGS.memory else ():
    memory[size] = compiled_memory(variant)
    logging.info("%s: %s", size or "one shot", memory[size])  # compiles of a large model take minutes each.
  seconds = {}
  if FLAGS.rounds:
    fns = {size: bench_step.train_step_fn(variant)[0] for size, variant in variants.items()}
    seconds, _ = bench_step.interleaved_medians(fns, FLAGS.rounds, FLAGS.steps)
  name = lambda size: f"micro-batch {size}" if size else "one shot"  # noqa: E731
  print(f"\n{'MixReorg' if config.model.mixreorg else 'GroupViT'}, global batch {config.input.batch_size}, "
        f"{config.input.image_size} px, dtype {config.model.dtype}, remat {config.model.remat}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s); memory from XLA's analysis of the compiled "
        f"step (GB)" + (f"; times are medians over {FLAGS.rounds} interleaved rounds of {FLAGS.steps} steps"
                        if seconds else "") + "\n")
  print("| step | temporaries | arguments | outputs | aliased | peak | peak / one shot | compile s | s/step | "
        "time / one shot |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for size in sizes:
    timing = (f"{seconds[size]:.3f} | {seconds[size] / seconds[0]:.2f}x" if seconds else "- | -")
    m = memory.get(size)
    analysis = (f"{m['temp']:.2f} | {m['arguments']:.2f} | {m['outputs']:.2f} | {m['aliased']:.2f} | "
                f"{m['peak']:.2f} | {m['peak'] / memory[0]['peak']:.2f} | {m['compile_s']:.0f}" if m else
                "- | - | - | - | - | - | -")
    print(f"| {name(size)} | {analysis} | {timing} |")


if __name__ == "__main__":
  define_flags()
  app.run(main)
