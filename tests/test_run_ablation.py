"""The ablation runner: the table (mean ± std over seeds, baselines) and the tracked file of finished runs."""
import json

import pytest

from mixreorg_jax.tools import run_ablation


def test_table_reports_mean_std_per_variant_and_baselines():
  """Runs recorded before config.evals (eval/mIoU, eval/tuning_mIoU, ...) and after (eval/heldout/mIoU,
  eval/tuning/mIoU, ...) make the same table."""
  results = {
      "groupvit": [{"eval/mIoU": 10.0, "eval/chance_mIoU": 8.0, "eval/untrained_mIoU": 5.0, "eval/image_top1": 70.0,
                    "eval/image_top1_chance": 20.0, "eval/groups_per_image": 3.0, "eval/tuning_mIoU": 11.0},
                   {"eval/heldout/mIoU": 14.0, "eval/heldout/chance_mIoU": 10.0, "eval/heldout/image_top1": 80.0,
                    "eval/heldout/groups_per_image": 5.0, "eval/tuning/mIoU": 13.0,
                    "eval/heldout/tuned_bg_mIoU": 16.0}],
      "mixreorg": [{"eval/mIoU": 20.0, "eval/chance_mIoU": 9.0, "eval/untrained_mIoU": 7.0},
                   {"eval/heldout/mIoU": 30.0, "eval/heldout/chance_mIoU": 9.0, "eval/heldout/untrained_mIoU": 6.0}],
  }
  rows = run_ablation.table(results).strip().split("\n")
  assert rows[2] == ("| GroupViT baseline (`model.mixreorg=False`) | 12.0 ± 2.0 | 10.0, 14.0 | 12.0 ± 1.0 | "
                     "16.0 ± 0.0 | 16.0 | 75.0 ± 5.0 | 4.0 ± 1.0 |")
  assert rows[3] == "| MixReorg | 25.0 ± 5.0 | 20.0, 30.0 | n/a | n/a |  | n/a | n/a |"
  assert rows[4] == ("| chance (random group assignment / random class) | 9.0 ± 0.7 | over 4 runs | | | | "
                     "20.0 ± 0.0 | |")
  assert rows[5] == "| untrained model (the runs' initial parameters) | 6.0 ± 0.8 | over 3 runs | | | |  | |"
  assert len(rows) == 6


def test_per_seed_tables_give_each_seed_its_figures_and_per_class_iou():
  h = "eval/heldout/"
  runs = [("3", {h + "mIoU": 30.0, "eval/tuning/mIoU": 28.0, h + "tuned_bg_threshold": 0.35, h + "tuned_bg_mIoU": 32.0,
                 h + "per_class/background": 70.0, h + "per_class/circle": 50.0}),
          ("7", {"eval/mIoU": 40.0, "eval/per_class/background": 80.0, "eval/per_class/circle": 10.0})]  # old names
  text = run_ablation.per_seed_tables("mixreorg", runs)
  rows = text.split("\n")
  assert rows[0] == "MixReorg, per seed:"
  assert rows[4] == "| 3 | 30.0 | 28.0 | 0.35 | 32.0 |  |  |  |  |"
  assert rows[5] == "| 7 | 40.0 |  |  |  |  |  |  |  |"
  assert rows[6] == "| mean ± std over 2 seeds | 35.0 ± 5.0 | 28.0 ± 0.0 |  | 32.0 ± 0.0 |  |  |  |  |"
  assert "| seed | background | circle |" in text and "| mean | 75.0 | 30.0 |" in text
  assert "threshold tuned on the tuning split:" not in text  # no run has tuned per-class IoU


def test_finished_runs_are_kept_in_the_results_file_and_not_run_again(tmp_path, monkeypatch):
  results = str(tmp_path / "runs.jsonl")
  trained = []

  def fake_train(variant, seed, run_dir, extra, reevaluate=False):
    trained.append((variant, seed, reevaluate))
    return {"eval/mIoU": 40.0 + int(seed) + 0.5 * reevaluate}

  monkeypatch.setattr(run_ablation, "train_run", fake_train)
  extra = ["--config.total_steps=10", "--config.a=1"]
  known = run_ablation.read_results(results)
  assert known == {}
  run_dir = tmp_path / "r"
  assert run_ablation.run("mixreorg", "1", str(run_dir), extra, results, known, "abc") == {"eval/mIoU": 41.0}
  # A new reader (another machine) finds it, whatever the order of the overrides, and trains nothing.
  again = run_ablation.read_results(results)
  assert run_ablation.run("mixreorg", "1", "unused", list(reversed(extra)), results, again, "abc") == {
      "eval/mIoU": 41.0}
  assert trained == [("mixreorg", "1", False)]
  # Another seed, other overrides or another demo config are other runs.
  run_ablation.run("mixreorg", "2", str(tmp_path / "r2"), extra, results, again, "abc")
  run_ablation.run("mixreorg", "1", str(tmp_path / "r3"), extra[:1], results, again, "abc")
  run_ablation.run("mixreorg", "1", str(tmp_path / "r4"), extra, results, again, "def")
  assert [t[1] for t in trained] == ["1", "2", "1", "1"]
  with open(results) as f:
    records = [json.loads(line) for line in f]
  assert [r["seed"] for r in records] == ["1", "2", "1", "1"] and records[0]["overrides"] == sorted(extra)
  assert [r["config"] for r in records] == ["abc", "abc", "abc", "def"]
  assert {"commit", "seconds", "metrics", "variant"} <= set(records[0])

  # Re-evaluation runs only where the workdir has checkpoints, and its record replaces the earlier one.
  assert run_ablation.run("mixreorg", "2", str(tmp_path / "r2"), extra, results, again, "abc", True) == {
      "eval/mIoU": 42.0}
  (run_dir / "checkpoints").mkdir(parents=True)
  assert run_ablation.run("mixreorg", "1", str(run_dir), extra, results, again, "abc", True) == {"eval/mIoU": 41.5}
  assert trained[-1] == ("mixreorg", "1", True) and len(trained) == 5
  final = run_ablation.read_results(results)
  key = run_ablation.run_key("mixreorg", "1", extra, "abc", run_ablation.cpu_kind(run_ablation.host_description()))
  assert final[key]["metrics"] == {"eval/mIoU": 41.5}
  assert final[key]["seconds"] == records[0]["seconds"]

  # Re-evaluation trains nothing: a run neither recorded nor finished is skipped ...
  assert run_ablation.run("mixreorg", "7", str(tmp_path / "r7"), extra, results, again, "abc", True) == {}
  assert len(trained) == 5
  # ... and one finished but not recorded is evaluated again, then recorded.
  (tmp_path / "r8").mkdir()
  (tmp_path / "r8" / "metrics.jsonl").write_text(json.dumps({"step": 9, "eval/mIoU": 1.0}) + "\n")
  assert run_ablation.run("mixreorg", "8", str(tmp_path / "r8"), extra, results, again, "abc", True) == {
      "eval/mIoU": 48.5}
  assert trained[-1] == ("mixreorg", "8", True)


def test_a_run_recorded_on_another_cpu_kind_is_trained_again_here(tmp_path, monkeypatch):
  """Float rounding differs between CPU kinds -- another model with the same instruction set included -- so a
  record from another kind does not stand for this one's run; --table_only picks a kind, an instruction set (every
  model with it) or "any"."""
  monkeypatch.setattr(run_ablation, "host_description", lambda: "Intel Xeon, 2 cores, AVX-512")
  here = run_ablation.cpu_kind(run_ablation.host_description())
  assert here == "Intel Xeon, AVX-512"
  results = str(tmp_path / "runs.jsonl")
  base = {"variant": "mixreorg", "seed": "0", "overrides": [], "config": "abc"}
  with open(results, "w") as f:
    f.write(json.dumps(dict(base, metrics={"eval/mIoU": 1.0}, host="AMD EPYC, 2 cores, no AVX-512")) + "\n")
    f.write(json.dumps(dict(base, metrics={"eval/mIoU": 4.0}, host="AMD EPYC, 2 cores, AVX-512")) + "\n")
    f.write(json.dumps(dict(base, metrics={"eval/mIoU": 2.0})) + "\n")  # from before records named their CPU
  trained = []
  monkeypatch.setattr(run_ablation, "train_run", lambda *a, **k: trained.append(a) or {"eval/mIoU": 3.0})
  known = run_ablation.read_results(results)
  assert run_ablation.run("mixreorg", "0", str(tmp_path / "r"), [], results, known, "abc") == {"eval/mIoU": 3.0}
  assert len(trained) == 1  # the AMD EPYC's AVX-512 record did not count as this Xeon's run.
  known = run_ablation.read_results(results)
  assert run_ablation.run("mixreorg", "0", str(tmp_path / "r"), [], results, known, "abc") == {"eval/mIoU": 3.0}
  assert len(trained) == 1  # this machine's own record does.
  find = lambda cpu: run_ablation.find_record(known, "mixreorg", "0", [], "abc", cpu)["metrics"]["eval/mIoU"]  # noqa: E731
  assert [find(k) for k in ("AMD EPYC, no AVX-512", "AMD EPYC, AVX-512", run_ablation.UNRECORDED, here)] == [
      1.0, 4.0, 2.0, 3.0]
  assert (find("no AVX-512"), find("AVX-512"), find("any")) == (1.0, 3.0, 3.0)  # the latest record that matches
  assert run_ablation.find_record(known, "mixreorg", "1", [], "abc", "any") is None
  assert run_ablation.find_record(known, "mixreorg", "0", [], "abc", "Intel Xeon, no AVX-512") is None
  assert run_ablation.cpu_kind("AMD EPYC, 2 cores, no AVX-512") == "AMD EPYC, no AVX-512"
  assert run_ablation.cpu_kind("AMD EPYC, 2 cores, AVX-512") == "AMD EPYC, AVX-512"
  assert run_ablation.cpu_kind("") == run_ablation.cpu_kind("AMD EPYC") == run_ablation.UNRECORDED


def test_config_fingerprint_follows_the_demo_config():
  assert run_ablation.config_fingerprint("mixreorg") == run_ablation.config_fingerprint("mixreorg")
  assert run_ablation.config_fingerprint("mixreorg") != run_ablation.config_fingerprint("groupvit")
  assert len(run_ablation.config_fingerprint("k4")) == 12


def test_the_recorded_runs_keep_their_fingerprint_and_their_metrics_read_under_the_current_names():
  """The tracked results file: its runs still count for the demo config (its evaluations are not fingerprinted)."""
  records = run_ablation.read_results(run_ablation.DEFAULT_RESULTS).values()
  for variant in ("mixreorg", "groupvit"):
    fingerprint = run_ablation.config_fingerprint(variant)
    runs = [r for r in records if r["variant"] == variant and r["config"] == fingerprint and not r["overrides"]]
    assert len(runs) >= 4, (variant, fingerprint)
  metrics = run_ablation.current_names(next(iter(records))["metrics"])
  assert {"eval/heldout/mIoU", "eval/heldout/per_class/circle", "eval/heldout/chance_mIoU"} <= set(metrics)
  assert run_ablation.current_names({"eval/tuning_mIoU": 1.0, "eval/tuned_bg_mIoU": 2.0}) == {
      "eval/tuning/mIoU": 1.0, "eval/heldout/tuned_bg_mIoU": 2.0}


def test_runs_with_other_overrides_get_their_own_directory():
  """A finished run's directory is reused on resume, so one with other overrides must not land in it."""
  plain = run_ablation.run_dir_name("mixreorg", "3", [])
  assert plain == "mixreorg_seed3"
  a = run_ablation.run_dir_name("mixreorg", "3", ["--config.a=1", "--config.b=2"])
  assert a.startswith("mixreorg_seed3_") and a != plain
  assert run_ablation.run_dir_name("mixreorg", "3", ["--config.b=2", "--config.a=1"]) == a  # order-free
  assert run_ablation.run_dir_name("mixreorg", "3", ["--config.a=2", "--config.b=2"]) != a
  assert run_ablation.run_dir_name("mixreorg", "4", ["--config.a=1", "--config.b=2"]) != a


def test_a_run_directory_of_another_config_is_neither_recorded_nor_resumed(tmp_path, monkeypatch):
  """After an edit of configs/demo.py, `<variant>_seed<S>` may hold a run of the config before."""
  from configs import demo  # pylint: disable=g-import-not-at-top

  def write_run(run_dir, crop_scale, seed=3):
    config = demo.get_config("k4")  # what the trainer writes to WORKDIR/config.json
    config.seed = config.input.seed = seed
    config.input.crop_scale = crop_scale
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 9, "eval/heldout/mIoU": 30.0}) + "\n")
    return str(run_dir)

  extra = ["--config.input.crop_scale=(0.25,1.0)"]
  monkeypatch.setattr(run_ablation.subprocess, "run", lambda *a, **k: None)  # nothing is trained here
  same = write_run(tmp_path / "same", (0.25, 1.0))
  assert run_ablation.train_run("k4", "3", same, extra) == {"eval/heldout/mIoU": 30.0}
  before = write_run(tmp_path / "before", (0.5, 1.0))
  with pytest.raises(ValueError, match=r"another config .* \(differs in input\.crop_scale\)"):
    run_ablation.train_run("k4", "3", before, extra)
  with pytest.raises(ValueError, match=r"differs in input\.seed, seed\)"):
    run_ablation.train_run("k4", "3", write_run(tmp_path / "seed", (0.25, 1.0), seed=4), extra)
  with pytest.raises(ValueError, match="another config"):  # a variant is a config too
    run_ablation.train_run("mixreorg", "3", same, extra)
  run_ablation.train_run("k4", "3", str(tmp_path / "new"), extra)  # nothing there yet: trained
  # A run written before a key was added, at the value that trains as before, is the same run.
  older = tmp_path / "older"
  older.mkdir()
  config = json.loads((tmp_path / "same" / "config.json").read_text())
  assert config["optim"].pop("ema_decay") == run_ablation.UNFINGERPRINTED["optim.ema_decay"]
  (older / "config.json").write_text(json.dumps(config))
  run_ablation.train_run("k4", "3", str(older), extra)


def test_a_new_record_says_which_cpu_trained_it(tmp_path, monkeypatch):
  monkeypatch.setattr(run_ablation, "train_run", lambda *a, **k: {"eval/mIoU": 1.0})
  results = str(tmp_path / "runs.jsonl")
  run_ablation.run("mixreorg", "0", str(tmp_path / "r"), [], results, {}, "abc")
  with open(results) as f:
    record = json.loads(f.readline())
  assert record["host"] == run_ablation.host_description()
  assert "AVX-512" in record["host"] and "cores" in record["host"]
