r"""Runs the demo ablation (same data, steps and seeds) and writes a markdown table of held-out mIoU.

  python -m mixreorg_jax.tools.run_ablation --workdir=workdirs/ablation --seeds=0,1,2,3,4 \
      [--variants=groupvit,mixreorg,...] [--results=docs/results/demo_runs.jsonl] [--config.key=value ...]

Each (variant, seed) trains `configs/demo.py:<variant>` in its own process and evaluates zero-shot on the tuning
and the held-out synthetic sets. Every finished run is appended to the results file (one JSON line: variant,
seed, the extra overrides, the fingerprint of the variant's demo config, the final eval/* metrics, the commit and
the time it took). That file is tracked in git, so the table can be rebuilt and an interrupted sweep resumed on
another machine: a run already in it is not run again, and a run killed half-way resumes from its last
checkpoint in the workdir. Only runs recorded on this machine's CPU kind (its model and whether it has AVX-512: float
rounding, hence a run, differs between them) count as done. Extra `--config.*` arguments are passed to every run (e.g. `--config.total_steps=450`
for a quicker sweep) and are part of what identifies it, as is the config fingerprint: after an edit of
configs/demo.py the earlier runs no longer count. `--table_only` rebuilds the table from the results file
without training, from the runs of this machine's CPU kind or of `--cpu_kind`; `--per_seed` adds each variant's per-seed and per-class tables; `--reevaluate` runs the final evaluation of finished runs again from their workdirs (after a
change of the evaluation, not of training) and appends their new metrics.

The table reports mean ± standard deviation over seeds (population std) of the held-out mIoU, the tuning-split
mIoU, image-level top-1 and groups per image, and two baselines computed with the same protocol: chance (random
group assignment) and the untrained model.
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import json
import os
import platform
import re
import subprocess
import sys
import time
import hashlib
import importlib.util
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from mixreorg_jax import workdir as workdir_lib
from mixreorg_jax.data import synthetic

VARIANTS = ("groupvit", "mixreorg", "no_context", "no_progressive", "no_restore", "k4")
DESCRIPTIONS = {
    "groupvit": "GroupViT baseline (`model.mixreorg=False`)",
    "mixreorg": "MixReorg",
    "no_context": "MixReorg, `mix.context_layers=0`",
    "no_progressive": "MixReorg, `mix.progressive_weight=0`",
    "no_restore": "MixReorg, `loss.w_rest=0`",
    "k4": "MixReorg, `mix.group_size=4`",
}
DEFAULT_RESULTS = "docs/results/demo_runs.jsonl"
CPU_KINDS = ("AVX-512", "no AVX-512")  # the instruction-set field, the last of host_description()
UNRECORDED = "unrecorded"  # the CPU kind of records from before they named it
DEMO_CONFIG = "configs/demo.py"
TUNING, HELD_OUT = "tuning", "heldout"  # the demo's evaluations (config.evals)
# Keys added to the config after runs were recorded, at the value that trains as before (not fingerprinted then).
UNFINGERPRINTED = {"debug_save_fault": "", "input.micro_batch_size": 0, "debug_hang": "", "peer_timeout_seconds": 20,
                   "peer_timeout_long_seconds": 1800, "loss.seg_targets": "caption",
                   "model.joint_text_projection": False, "loss.w_segment_naming": 0.0,
                   "optim.ema_decay": 0.0, "loss.w_prompt_uniformity": 0.0,
                   "input.synthetic_scene_share": -1.0, "loss.w_source_nouns": 0.0}
# The demo's evaluation section before config.evals (one evaluation, the synthetic sets), fingerprinted then.
RECORDED_EVAL_SECTION = {"config": "configs/eval/synthetic.py", "data_root": "", "every_steps": 0, "max_images": 0}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined when run as a script only, so that importing `table` defines no flags (tools share names)."""
  flags.DEFINE_string("workdir", "workdirs/ablation", "One sub-directory per run goes here.")
  flags.DEFINE_list("variants", list(VARIANTS), "Variants of configs/demo.py to run.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed (and config.input.seed) values.")
  flags.DEFINE_string("results", DEFAULT_RESULTS, "JSON-lines file of finished runs (read, then appended to).")
  flags.DEFINE_string("output", "", "Markdown table path (default <workdir>/ablation.md).")
  flags.DEFINE_bool("table_only", False, "Only rebuild the table from --results; train nothing.")
  flags.DEFINE_bool("per_seed", False, "Also write, per variant, its seeds' figures and per-class IoU.")
  flags.DEFINE_bool("reevaluate", False, "Evaluate finished runs again from their workdirs (no training) and "
                    "append their new metrics to --results.")
  flags.DEFINE_string("cpu_kind", "", "With --table_only, the runs of which CPU kind make the table: a kind as "
                      "`cpu_kind` writes it ('AMD EPYC, AVX-512'), an instruction set alone "
                      f"({', '.join(repr(k) for k in CPU_KINDS)}: every model with it), '{UNRECORDED}' or 'any' (the "
                      "last record of each run, whatever its CPU). Default: this machine's kind, the only one a sweep "
                      "counts as done.")


def current_names(metrics: Dict[str, float]) -> Dict[str, float]:
  """A run's metrics under the names of the demo's evaluations, eval/tuning/... and eval/heldout/....

  Runs recorded before config.evals had one evaluation: its metrics (eval/mIoU, eval/per_class/<class>,
  eval/tuned_bg_mIoU, ...) are those of the held-out set, and eval/tuning_mIoU was the tuning split's mIoU.
  """
  renamed = {}
  for key, value in metrics.items():
    if key == "eval/tuning_mIoU":
      key = f"eval/{TUNING}/mIoU"
    elif not key.startswith((f"eval/{TUNING}/", f"eval/{HELD_OUT}/")):
      key = f"eval/{HELD_OUT}/" + key[len("eval/"):]
    renamed[key] = value
  return renamed


def final_metrics(run_dir: str) -> Dict[str, float]:
  """The last eval/* scalars of a finished run (from its metrics.jsonl), or {} if it has none."""
  path = workdir_lib.metrics_path(run_dir)
  if not os.path.exists(path):
    return {}
  found = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      found.update({k: v for k, v in row.items() if k.startswith("eval/")})
  return found


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config file as `--config=` loads it: "configs/x.py" or "configs/x.py:arg" -> its get_config()."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config {path!r} does not exist (run from the repository root).")
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def drop_unfingerprinted(config: Dict) -> Dict:
  """Removes from a config dict, in place, the keys of UNFINGERPRINTED that are at their default (or absent, as
  in the configs written before them). -> config."""
  for key, default in UNFINGERPRINTED.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node.get(parent, {})
    if name in node and node[name] == default:
      del node[name]
  return config


def config_fingerprint(variant: str) -> str:
  """12 hex digits of the SHA-1 of what `configs/demo.py:<variant>` trains, as JSON: changes whenever the training
  part of the demo config does, not when its evaluations do (re-evaluating a run is --reevaluate).

  So that the runs in the results file keep their fingerprint, the keys added since at a default that trains the
  same (UNFINGERPRINTED) are left out, and the evaluations stand as the section the runs were recorded with.
  """
  config = load_config(f"{DEMO_CONFIG}:{variant}").to_dict()
  del config["evals"]
  drop_unfingerprinted(config)
  config["eval"] = RECORDED_EVAL_SECTION
  if synthetic.DATA_VERSION > 1:  # the data the demo generates is part of what it trains on.
    config["synthetic_data_version"] = synthetic.DATA_VERSION
  return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cpu_kind(host: str) -> str:
  """The CPU kind of a record's `host` (host_description, "<model>, <n> cores, <instruction set>"): "<model>,
  <instruction set>", e.g. "AMD EPYC, AVX-512", or UNRECORDED for the records written before runs named their CPU.
  Two models with the same instruction set are two kinds: the demo at seed 0 scores 22.5 tuning mIoU on an AMD
  EPYC with AVX-512 and 9.7 on an Intel Xeon with AVX-512."""
  parts = host.rsplit(", ", 2) if host else []
  if len(parts) != 3 or parts[-1] not in CPU_KINDS:
    return UNRECORDED
  return f"{parts[0]}, {parts[-1]}"


def is_of_kind(kind: str, wanted: str) -> bool:
  """Whether a record of CPU kind `kind` is one of `wanted`: a kind, an instruction set of CPU_KINDS alone (every
  model with it) or "any"."""
  return wanted in ("any", kind) or (wanted in CPU_KINDS and kind.rsplit(", ", 1)[-1] == wanted)


def run_key(variant: str, seed: str, extra: Sequence[str], fingerprint: str, cpu: str) -> Tuple:
  """What identifies a run in the results file: variant, seed, the sorted extra overrides, the fingerprint of
  the variant's demo config and the CPU kind it trained on (a run does not reproduce on another kind)."""
  return (variant, str(seed), tuple(sorted(extra)), fingerprint, cpu)


def read_results(path: str) -> Dict[Tuple, Dict]:
  """run_key -> record of every finished run in the results file ({} if there is none)."""
  records = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          record = json.loads(line)
          key = run_key(record["variant"], record["seed"], record["overrides"], record.get("config", ""),
                        cpu_kind(record.get("host", "")))
          records[key] = record  # a later line (a re-evaluation) replaces an earlier one.
  return records


def find_record(known: Dict[Tuple, Dict], variant: str, seed: str, extra: Sequence[str], fingerprint: str,
                cpu: str) -> Optional[Dict]:
  """The record of a run on the CPU kinds `cpu` names (`is_of_kind`), the latest where several match; None if
  there is none."""
  run = run_key(variant, seed, extra, fingerprint, "")[:-1]
  found = [r for k, r in known.items() if k[:-1] == run and is_of_kind(k[-1], cpu)]
  return found[-1] if found else None


def run_dir_name(variant: str, seed: str, extra: Sequence[str]) -> str:
  """The run's directory under --workdir: `<variant>_seed<seed>`, plus a hash of the sorted extra overrides when
  there are any, so that runs of the same variant and seed with other overrides never share (and silently reuse)
  one directory."""
  name = f"{variant}_seed{seed}"
  if extra:
    name += "_" + hashlib.sha256(json.dumps(sorted(extra)).encode()).hexdigest()[:8]
  return name


def host_description() -> str:
  """The CPU the run trained on (model name and whether it has AVX-512): float rounding, hence a run's trajectory,
  differs between CPU kinds, so a figure is only reproduced bit for bit on the same kind."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    names = re.findall(r"^model name\s*:\s*(.+)$", info, re.M)
    model = names[0].strip() if names else model
    flags_line = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    avx512 = bool(flags_line and "avx512f" in flags_line.group(1).split())
  except OSError:
    avx512 = False
  return f"{model}, {os.cpu_count()} cores, {CPU_KINDS[0] if avx512 else CPU_KINDS[1]}"


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def config_args(variant: str, seed: str, extra: Sequence[str]) -> List[str]:
  """The trainer's --config arguments for (variant, seed, extra): the demo variant, its seed, then the overrides."""
  return [f"--config={DEMO_CONFIG}:{variant}", f"--config.seed={seed}", f"--config.input.seed={seed}", *extra]


def train_command(variant: str, seed: str, run_dir: str, extra: Sequence[str]) -> List[str]:
  return [sys.executable, "-m", "mixreorg_jax.train", f"--workdir={run_dir}", *config_args(variant, seed, extra)]


def trained_config(variant: str, seed: str, extra: Sequence[str]) -> Dict:
  """What `train_command(variant, seed, ..., extra)` trains: its config as the trainer writes it to
  WORKDIR/config.json (JSON), without the evaluations."""
  argv = ["run_ablation", *config_args(variant, seed, extra)]
  parser = flags.FlagValues()
  # The trainer's flag, reading its --config.* overrides from argv (not sys.argv).
  config_flags.DEFINE_config_file("config", None, "", flag_values=parser, lock_config=True, sys_argv=argv)
  parser(argv)
  config = json.loads(parser.config.to_json_best_effort())
  del config["evals"]
  return config


def check_run_dir(variant: str, seed: str, run_dir: str, extra: Sequence[str]) -> None:
  """Raises if run_dir holds a run (finished or not) of another config than (variant, seed, extra) trains now.

  A run directory is named by variant, seed and overrides only, so after an edit of configs/demo.py it may hold a
  run of the config before: its metrics must not be recorded, nor the run resumed, under the config after.
  """
  path = workdir_lib.config_path(run_dir)
  if not os.path.exists(path):
    return
  with open(path) as f:
    found = json.load(f)
  found.pop("evals", None)
  # A run from before a key was added, at the value that trains as before, is the same run (as its fingerprint).
  found, expected = drop_unfingerprinted(found), drop_unfingerprinted(trained_config(variant, seed, extra))
  if found != expected:
    differ = sorted(_differences(found, expected))
    raise ValueError(f"{run_dir} holds a run of another config than {DEMO_CONFIG}:{variant} at seed {seed} with "
                     f"{list(extra)} trains now (differs in {', '.join(differ[:8])}"
                     f"{', ...' if len(differ) > 8 else ''}): move it away, or give another --workdir.")


def _differences(a: Dict, b: Dict, prefix: str = "") -> List[str]:
  """The dotted keys whose values differ between two nested dicts."""
  keys = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      keys += _differences(x, y, f"{prefix}{key}.")
    elif x != y:
      keys.append(prefix + key)
  return keys


def train_run(variant: str, seed: str, run_dir: str, extra: Sequence[str], reevaluate: bool = False
              ) -> Dict[str, float]:
  """Trains and evaluates one run in run_dir (resuming it if it was interrupted). -> its final eval metrics.

  A finished run is left alone unless reevaluate: then the trainer, finding the last step checkpointed, only
  runs the final evaluation again.
  """
  check_run_dir(variant, seed, run_dir, extra)
  if reevaluate or not final_metrics(run_dir):
    cmd = train_command(variant, seed, run_dir, extra)
    print(" ".join(cmd), flush=True)
    os.makedirs(os.path.dirname(run_dir) or ".", exist_ok=True)
    with open(os.path.join(os.path.dirname(run_dir), f"{os.path.basename(run_dir)}.log"), "a") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
  return final_metrics(run_dir)


def append_record(results_path: str, record: Dict) -> None:
  os.makedirs(os.path.dirname(results_path) or ".", exist_ok=True)
  with open(results_path, "a") as f:
    f.write(json.dumps(record) + "\n")


def run(variant: str, seed: str, run_dir: str, extra: Sequence[str], results_path: str,
        known: Dict[str, Dict], fingerprint: str, reevaluate: bool = False) -> Dict[str, float]:
  """The metrics of (variant, seed, extra) at the demo config `fingerprint`: from the results file, or trained
  now and appended to it. Only a run recorded on this machine's CPU kind counts as done. With reevaluate, a run
  whose workdir is here is evaluated again, and nothing is trained: a run neither recorded nor finished here is
  skipped (-> {})."""
  key = run_key(variant, seed, extra, fingerprint, cpu_kind(host_description()))
  if key in known:
    if not (reevaluate and os.path.isdir(workdir_lib.checkpoint_dir(run_dir))):
      return known[key]["metrics"]
    record = dict(known[key], metrics=train_run(variant, seed, run_dir, extra, reevaluate=True),
                  evaluated_commit=_commit())
  elif reevaluate and not final_metrics(run_dir):
    print(f"{variant} at seed {seed}: no finished run in {run_dir} to evaluate again; skipped.", flush=True)
    return {}
  else:
    start = time.time()
    metrics = train_run(variant, seed, run_dir, extra, reevaluate)
    record = {"variant": variant, "seed": str(seed), "overrides": sorted(extra), "config": fingerprint,
              "metrics": metrics, "commit": _commit(), "seconds": round(time.time() - start, 1),
              "host": host_description()}
  append_record(results_path, record)
  known[key] = record
  return record["metrics"]


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
  """Markdown: per variant, held-out mIoU (mean ± std and per seed), tuning-split mIoU, held-out mIoU at the
  background threshold chosen on the tuning split (mean ± std and per seed), image-level zero-shot top-1 and
  groups per image (mean ± std over seeds), then the chance and untrained-model baselines over all runs. Runs
  recorded under the names from before config.evals read the same (current_names)."""
  lines = ["| variant | held-out mIoU (mean ± std) | mIoU per seed | tuning mIoU | held-out mIoU, threshold "
           "tuned | tuned, per seed | image-level top-1 % | groups per image |",
           "|---|---|---|---|---|---|---|---|"]
  per_seed = lambda values: ", ".join(f"{m:.1f}" for m in values)  # noqa: E731
  held_out = f"eval/{HELD_OUT}"
  for variant, runs in results.items():
    runs = [current_names(r) for r in runs]
    mious = _logged(runs, f"{held_out}/mIoU")
    tuned = _logged(runs, f"{held_out}/tuned_bg_mIoU")
    lines.append(f"| {DESCRIPTIONS.get(variant, variant)} | {_mean_std(mious)} | {per_seed(mious)} | "
                 f"{_mean_std_of(runs, f'eval/{TUNING}/mIoU')} | {_mean_std(tuned)} | {per_seed(tuned)} | "
                 f"{_mean_std_of(runs, f'{held_out}/image_top1')} | "
                 f"{_mean_std_of(runs, f'{held_out}/groups_per_image')} |")
  all_runs = [current_names(r) for runs in results.values() for r in runs]
  baselines = ((f"{held_out}/chance_mIoU", f"{held_out}/image_top1_chance",
                "chance (random group assignment / random class)"),
               (f"{held_out}/untrained_mIoU", None, "untrained model (the runs' initial parameters)"))
  for miou_key, top1_key, description in baselines:
    values = _logged(all_runs, miou_key)
    if values:
      top1 = _mean_std_of(all_runs, top1_key) if top1_key else ""
      lines.append(f"| {description} | {_mean_std(values)} | over {len(values)} runs | | | | {top1} | |")
  return "\n".join(lines) + "\n"


def per_seed_tables(variant: str, runs: Sequence[Tuple[str, Dict[str, float]]]) -> str:
  """Markdown for one variant's (seed, metrics) runs: one row per seed (held-out and tuning mIoU, the threshold
  tuned on the tuning split and the held-out mIoU at it, image-level top-1, groups per image, the chance and
  untrained baselines) with the mean ± std of the mIoUs, then the held-out per-class IoU at the protocol's
  threshold and at the tuned one, per seed and their mean."""
  held_out, tuning = f"eval/{HELD_OUT}", f"eval/{TUNING}"
  runs = [(seed, current_names(metrics)) for seed, metrics in runs]
  value = lambda metrics, key, digits=1: f"{metrics[key]:.{digits}f}" if key in metrics else ""  # noqa: E731
  # (header, metric, digits, whether the last row gives its mean ± std)
  columns = [("held-out mIoU", f"{held_out}/mIoU", 1, True), ("tuning mIoU", f"{tuning}/mIoU", 1, True),
             ("threshold tuned on the tuning split", f"{held_out}/tuned_bg_threshold", 2, False),
             ("held-out mIoU at it", f"{held_out}/tuned_bg_mIoU", 1, True),
             ("image-level top-1 %", f"{held_out}/image_top1", 1, False),
             ("groups per image", f"{held_out}/groups_per_image", 1, False),
             ("chance mIoU", f"{held_out}/chance_mIoU", 1, False),
             ("untrained mIoU", f"{held_out}/untrained_mIoU", 1, False)]
  lines = [f"{DESCRIPTIONS.get(variant, variant)}, per seed:", "",
           "| seed | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for seed, metrics in runs:
    lines.append(f"| {seed} | " + " | ".join(value(metrics, key, digits) for _, key, digits, _ in columns) + " |")
  summary = [_mean_std_of([m for _, m in runs], key) if summarised else "" for _, key, _, summarised in columns]
  lines.append(f"| mean ± std over {len(runs)} seeds | " + " | ".join(summary) + " |")
  for title, prefix in (("at the protocol's background threshold", f"{held_out}/per_class/"),
                        ("at the threshold tuned on the tuning split", f"{held_out}/tuned_bg_per_class/")):
    classes = list(dict.fromkeys(k[len(prefix):] for _, m in runs for k in m if k.startswith(prefix)))
    if not classes:
      continue
    lines += ["", f"Held-out per-class IoU, {title}:", "", "| seed | " + " | ".join(classes) + " |",
              "|---" * (len(classes) + 1) + "|"]
    for seed, metrics in runs:
      lines.append(f"| {seed} | " + " | ".join(value(metrics, prefix + c) for c in classes) + " |")
    means = [np.mean(_logged([m for _, m in runs], prefix + c)) for c in classes]
    lines.append("| mean | " + " | ".join(f"{x:.1f}" for x in means) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  console.to_log_file(console.tool_log_path("run_ablation"))
  extra = [a for a in argv[1:] if a.startswith("--config.")]
  known = read_results(FLAGS.results)
  fingerprints = {v: config_fingerprint(v) for v in FLAGS.variants}
  here = cpu_kind(host_description())
  cpu = FLAGS.cpu_kind or here
  kinds = sorted({key[-1] for key in known} | {here, UNRECORDED}) + list(CPU_KINDS) + ["any"]
  if cpu not in kinds:
    raise ValueError(f"--cpu_kind={cpu!r}: expected one of {kinds} (the kinds of {FLAGS.results}, this machine's, "
                     "an instruction set alone, or any).")
  if FLAGS.cpu_kind and not FLAGS.table_only:
    raise ValueError("--cpu_kind selects recorded runs for --table_only; a sweep trains on this machine's kind.")
  results = {v: [] for v in FLAGS.variants}  # variant -> [(seed, metrics)]
  # Seed-major order: an interrupted sweep has every variant at the same number of seeds.
  for seed in FLAGS.seeds:
    for variant in FLAGS.variants:
      if FLAGS.table_only:
        record = find_record(known, variant, seed, extra, fingerprints[variant], cpu)
        metrics = record["metrics"] if record else {}
      else:
        run_dir = os.path.join(FLAGS.workdir, run_dir_name(variant, seed, extra))
        metrics = run(variant, seed, run_dir, extra, FLAGS.results, known, fingerprints[variant], FLAGS.reevaluate)
      if metrics:
        results[variant].append((seed, metrics))
  text = table({v: [m for _, m in runs] for v, runs in results.items() if runs})
  if FLAGS.per_seed:
    text += "".join("\n" + per_seed_tables(v, runs) for v, runs in results.items() if runs)
  output = FLAGS.output or os.path.join(FLAGS.workdir, "ablation.md")
  os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
  with open(output, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  define_flags()
  # --config.* arguments are not ours: they are left in argv and passed on to every run.
  app.run(main, flags_parser=lambda argv: FLAGS(argv, known_only=True))
