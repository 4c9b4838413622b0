r"""Runs the demo ablation (same data, steps and seeds) and writes a markdown table of held-out mIoU.

  python -m mixreorg_jax.tools.run_ablation --workdir=workdirs/ablation --seeds=0,1,2 [--config.key=value ...]

Each (variant, seed) trains `configs/demo.py:<variant>` in its own process and evaluates zero-shot on the held-out
synthetic set; finished runs are reused, so an interrupted sweep resumes. Extra `--config.*` arguments are passed
to every run (e.g. `--config.total_steps=300` for a quicker sweep). The table reports mean ± standard deviation
over seeds, and two baselines computed with the same protocol: chance (random group assignment) and the
untrained model.
"""
import json
import os
import subprocess
import sys
from typing import Dict, List

from absl import app
from absl import flags
import numpy as np

VARIANTS = ("groupvit", "mixreorg", "no_context", "no_progressive", "no_restore")
DESCRIPTIONS = {
    "groupvit": "GroupViT baseline (`model.mixreorg=False`)",
    "mixreorg": "MixReorg",
    "no_context": "MixReorg, `mix.context_layers=0`",
    "no_progressive": "MixReorg, `mix.progressive_weight=0`",
    "no_restore": "MixReorg, `loss.w_rest=0`",
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined when run as a script only, so that importing `table` defines no flags (tools share names)."""
  flags.DEFINE_string("workdir", "workdirs/ablation", "One sub-directory per run goes here.")
  flags.DEFINE_list("variants", list(VARIANTS), "Variants of configs/demo.py to run.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed values.")
  flags.DEFINE_string("output", "", "Markdown table path (default <workdir>/ablation.md).")


def final_metrics(run_dir: str) -> Dict[str, float]:
  """The last eval/* scalars of a finished run (from its metrics.jsonl), or {} if it has none."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  found = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      found.update({k: v for k, v in row.items() if k.startswith("eval/")})
  return found


def run(variant: str, seed: str, run_dir: str, extra: List[str]) -> Dict[str, float]:
  if not final_metrics(run_dir):
    cmd = [sys.executable, "-m", "mixreorg_jax.train", f"--config=configs/demo.py:{variant}",
           f"--workdir={run_dir}", f"--config.seed={seed}", f"--config.input.seed={seed}", *extra]
    print(" ".join(cmd), flush=True)
    with open(os.path.join(os.path.dirname(run_dir), f"{os.path.basename(run_dir)}.log"), "w") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
  return final_metrics(run_dir)


def _mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.1f} ± {values.std():.1f}" if values.size else "n/a"


def _logged(runs: List[Dict[str, float]], key: str) -> List[float]:
  """The values of `key` in the runs that logged it."""
  return [r[key] for r in runs if key in r]


def _mean_std_of(runs: List[Dict[str, float]], key: str) -> str:
  """_mean_std of `key` over the runs that logged it."""
  return _mean_std(_logged(runs, key))


def table(results: Dict[str, List[Dict[str, float]]]) -> str:
  """Markdown: per variant, held-out mIoU, image-level zero-shot top-1 and groups per image (mean ± std over
  seeds), then the chance and untrained-model baselines over all runs."""
  lines = ["| variant | held-out mIoU (mean ± std) | mIoU per seed | image-level top-1 % (mean ± std) | "
           "groups per image |",
           "|---|---|---|---|---|"]
  for variant, runs in results.items():
    mious = [r["eval/mIoU"] for r in runs]
    lines.append(f"| {DESCRIPTIONS[variant]} | {_mean_std(mious)} | {', '.join(f'{m:.1f}' for m in mious)} | "
                 f"{_mean_std_of(runs, 'eval/image_top1')} | {_mean_std_of(runs, 'eval/groups_per_image')} |")
  all_runs = [r for runs in results.values() for r in runs]
  baselines = (("eval/chance_mIoU", "eval/image_top1_chance", "chance (random group assignment / random class)"),
               ("eval/untrained_mIoU", None, "untrained model (the runs' initial parameters)"))
  for miou_key, top1_key, description in baselines:
    values = _logged(all_runs, miou_key)
    if values:
      top1 = _mean_std_of(all_runs, top1_key) if top1_key else ""
      lines.append(f"| {description} | {_mean_std(values)} | over {len(values)} runs | {top1} | |")
  return "\n".join(lines) + "\n"


def main(argv):
  extra = [a for a in argv[1:] if a.startswith("--config.")]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  # Seed-major order: an interrupted sweep has every variant at the same number of seeds.
  runs = {(v, s): run(v, s, os.path.join(FLAGS.workdir, f"{v}_seed{s}"), extra)
          for s in FLAGS.seeds for v in FLAGS.variants}
  results = {v: [runs[v, s] for s in FLAGS.seeds] for v in FLAGS.variants}
  text = table(results)
  output = FLAGS.output or os.path.join(FLAGS.workdir, "ablation.md")
  with open(output, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  define_flags()
  # --config.* arguments are not ours: they are left in argv and passed on to every run.
  app.run(main, flags_parser=lambda argv: FLAGS(argv, known_only=True))
