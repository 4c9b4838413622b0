"""The trainer in-process: exact resume after SIGTERM, the NaN guard, early config errors, export -> inference."""
import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mixreorg_jax import inference
from mixreorg_jax import train
from mixreorg_jax.tools import export
from tests import test_train_common as common


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return common.synthetic_data(tmp_path_factory)


def latest_step(workdir):
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints"))) as manager:
    return manager.latest_step()


def all_finite(tree):
  return all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(tree))


@pytest.mark.slow
def test_exact_resume_after_sigterm(synthetic_dir, tmp_path, monkeypatch):
  """Steps n+1..2n of a run stopped by SIGTERM at n and restarted equal those of an uninterrupted run, and so does
  the parameters' moving average that the export takes. Each run closes its checkpoints in a long phase of the peer
  watch: a close that waits for the last save must not be taken for a hang."""
  n = 3
  config = common.train_config(synthetic_dir, total_steps=2 * n, **{"optim.ema_decay": 0.5})
  watches, closed_in = [], []

  class RecordingWatch(train.PeerWatch):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      watches.append(self)

  close = ocp.CheckpointManager.close

  def recording_close(self):
    if watches and not watches[-1]._stop.is_set():  # the trainer's own manager, while its watch is on.
      closed_in.append(watches[-1].phase)
    close(self)

  monkeypatch.setattr(train, "PeerWatch", RecordingWatch)
  monkeypatch.setattr(ocp.CheckpointManager, "close", recording_close)
  train.train_and_evaluate(config, str(tmp_path / "straight"))

  write_scalars = train.JsonlWriter.write_scalars

  def signal_at_n(self, step, scalars):  # a real SIGTERM, delivered while step n is being logged.
    write_scalars(self, step, scalars)
    if step == n and "train/loss" in scalars:
      os.kill(os.getpid(), signal.SIGTERM)

  resumed = str(tmp_path / "resumed")
  with monkeypatch.context() as patched, pytest.raises(train.Preempted, match=f"at step {n}"):
    patched.setattr(train.JsonlWriter, "write_scalars", signal_at_n)
    train.train_and_evaluate(config, resumed)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer put the handler back.
  assert latest_step(resumed) == n
  assert os.path.exists(os.path.join(resumed, "input_state", f"step_{n}", "process_0_of_1.index"))

  train.train_and_evaluate(config, resumed)
  assert closed_in == ["save"] * 3  # the straight run, the preempted one and its resumption.
  straight, again = common.losses(str(tmp_path / "straight")), common.losses(resumed)
  assert sorted(again) == list(range(1, 2 * n + 1))
  np.testing.assert_allclose([again[s] for s in range(n + 1, 2 * n + 1)],
                             [straight[s] for s in range(n + 1, 2 * n + 1)], rtol=0, atol=1e-6)
  straight_ema, _ = export.restore_variables(str(tmp_path / "straight"), config)
  resumed_ema, _ = export.restore_variables(resumed, config)
  raw, _ = export.restore_variables(resumed, config, raw_params=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), resumed_ema, straight_ema)
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(resumed_ema["params"]),
                                                 jax.tree.leaves(raw["params"]))) > 1e-5


@pytest.mark.slow
def test_nan_guard_skips_counts_and_export_loads(synthetic_dir, tmp_path):
  """Poisoned steps are skipped and counted, training recovers, the checkpoint is finite and exports."""
  workdir = str(tmp_path / "run")
  config = common.train_config(synthetic_dir, total_steps=4, debug_nan_step=1, max_skipped_steps=3)
  config.debug_nan_steps = 2  # poisons the 2nd and 3rd steps.
  config.input.normalization = "imagenet"  # the export records the pixel statistics the weights were trained with.
  train.train_and_evaluate(config, workdir)
  by_step = {m["step"]: m for m in common.read_metrics(workdir) if "train/loss" in m}
  assert [by_step[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
  assert np.isnan(by_step[2]["train/grad_norm"]) and np.isnan(by_step[3]["train/grad_norm"])
  assert np.isfinite(by_step[4]["train/grad_norm"]) and np.isfinite(by_step[4]["train/loss"])

  variables, step = export.restore_variables(workdir, export.load_train_config(workdir))
  assert step == 4 and all_finite(variables)

  out = export.export(workdir, str(tmp_path / "export"))
  model = inference.load(out)
  assert model.tokenizer == {"kind": "sentencepiece", "path": "", "context_length": 8}
  assert model.image_normalization == "imagenet"
  np.testing.assert_array_equal(np.asarray(model.variables["params"]["logit_scale"]),
                                variables["params"]["logit_scale"])
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  emb = np.asarray(model.encode_image(images))
  assert emb.shape == (2, 16) and np.allclose(np.linalg.norm(emb, axis=-1), 1, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("log_steps, ckpt_steps", [(1, 1), (100, 1), (100, 100)])
def test_nan_guard_halts_at_the_step_that_reaches_max_skipped_steps(synthetic_dir, tmp_path, log_steps, ckpt_steps):
  """Steps 2 and 3 are poisoned, the limit is 2: the run halts at step 3, whether that is a log step, a checkpoint
  step or neither, and never checkpoints step 3 or later."""
  workdir = str(tmp_path / "run")
  config = common.train_config(synthetic_dir, total_steps=8, log_steps=log_steps, ckpt_steps=ckpt_steps,
                               keep_ckpts=5, debug_nan_step=1, max_skipped_steps=2)
  config.debug_nan_steps = 100
  halt = r"Halting at step 3: 2 consecutive steps .* config\.max_skipped_steps=2"
  with pytest.raises(FloatingPointError, match=halt):
    train.train_and_evaluate(config, workdir)
  assert all(s <= 3 for s in common.losses(workdir))  # nothing logged past the halt.
  assert latest_step(workdir) == (2 if ckpt_steps == 1 else None)
  if ckpt_steps == 1:
    variables, _ = export.restore_variables(workdir, config)
    assert all_finite(variables)


@pytest.mark.slow
def test_non_finite_parameters_are_never_saved(synthetic_dir, tmp_path):
  """An infinite learning rate makes step 1's update non-finite while its loss is finite (so the guard lets it
  through): the save of step 1 refuses, and no checkpoint exists."""
  workdir = str(tmp_path / "run")
  config = common.train_config(synthetic_dir, total_steps=2, ckpt_steps=1)
  config.optim.base_lr = float("inf")
  with pytest.raises(FloatingPointError, match="Refusing to checkpoint non-finite parameters at step 1"):
    train.train_and_evaluate(config, workdir)
  assert latest_step(workdir) is None


@pytest.mark.slow
def test_failed_save_keeps_the_previous_checkpoint_and_names_directory_and_error(synthetic_dir, tmp_path):
  """The disk fills up during the save of step 4 (ENOSPC injected where orbax commits it): the run stops with a
  message naming the directory and the error, and step 2 stays the latest checkpoint, from which a rerun resumes."""
  workdir = str(tmp_path / "run")
  config = common.train_config(synthetic_dir, total_steps=6, ckpt_steps=2, debug_save_fault="enospc:4")
  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  with pytest.raises(train.SaveFailed, match=rf"Saving checkpoint 4 into {ckpt_dir} failed: .*No space left on device"
                                             r".*latest complete checkpoint is step 2"):
    train.train_and_evaluate(config, workdir)
  assert latest_step(workdir) == 2
  config.debug_save_fault = ""
  train.train_and_evaluate(config, workdir)
  assert latest_step(workdir) == 6


@pytest.mark.slow
def test_two_evaluations_log_their_curves_and_their_protocols(synthetic_dir, tmp_path):
  """The demo's evaluations on a tiny run: tuning every 2 steps and at the end, held-out at the end at the
  threshold tuned on it; both curves in metrics.jsonl and both protocols in config.json."""
  workdir = str(tmp_path / "run")
  config = common.train_config(synthetic_dir, total_steps=4, **{
      "evals.tuning.synthetic": "voc_val", "evals.heldout.synthetic": "voc", "evals.tuning.every_steps": 2,
      "evals.tuning.data.max_images": 2, "evals.heldout.data.max_images": 2, "evals.heldout.baselines": False,
      "evals.heldout.image_recognition": False, "evals.heldout.num_visualizations": 0})
  results = train.train_and_evaluate(config, workdir)
  metrics = common.read_metrics(workdir)
  assert [m["step"] for m in metrics if "eval/tuning/mIoU" in m] == [2, 4]
  assert [m["step"] for m in metrics if "eval/heldout/mIoU" in m] == [4]
  assert results["eval/heldout/tuned_bg_threshold"] == results["eval/tuning/best_bg_threshold"]
  assert "eval/heldout/per_class/circle" in results and "eval/heldout/chance_mIoU" not in results
  with open(os.path.join(workdir, "config.json")) as f:
    evals = json.load(f)["evals"]
  assert evals["tuning"]["every_steps"] == 2 and evals["tuning"]["sweep_bg_thresholds"]
  assert evals["heldout"]["bg_threshold_from"] == "tuning" and evals["heldout"]["window"] == 0
  assert evals["heldout"]["prompt_templates"] == ["a photo of a {}."]
  assert os.path.exists(os.path.join(workdir, "eval", "tuning", "metrics.json"))
  assert os.path.exists(os.path.join(workdir, "training_curves.png"))


@pytest.mark.parametrize("override, message", [
    ({"mix.group_size": 4}, "config.mix.group_size"),  # K = 4 does not divide the per-device batch of 16 / 8 devices.
    ({"input.data_dir": "/nonexistent/train-*.tfrecord"}, "config.input.data_dir"),
    ({"input.normalization": "imagenet21k"}, "config.input.normalization"),
    ({"input.image_size": 36}, "config.input.image_size"),
    ({"evals.tuning.data.root": "/nonexistent/voc"}, "config.evals.tuning.data.root"),
    ({"loss.seg_targets": "words"}, "config.loss.seg_targets='words'"),
    ({"loss.seg_targets": "nouns"}, "config.loss.seg_targets='nouns' needs the noun prompts"),
    ({"loss.w_segment_naming": 1.0}, "config.loss.w_segment_naming needs the noun prompts"),
    ({"loss.w_source_nouns": 1.0}, "config.loss.w_source_nouns needs the noun prompts"),
    ({"optim.ema_decay": 1.0}, r"config.optim.ema_decay=1.0 must be in \[0, 1\)"),
    ({"input.synthetic_scene_share": 1.5}, r"config.input.synthetic_scene_share=1.5: expected a probability"),
])
def test_config_errors_fail_before_compiling(synthetic_dir, tmp_path, override, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    train.train_and_evaluate(common.train_config(synthetic_dir, **override), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_peer_watch_takes_for_hung_the_processes_at_the_earliest_step_of_a_still_run(tmp_path):
  """Three processes' "step phase" seen over time: hung are the processes at the earliest step once no process has
  moved for the timeout of their phase; a save or the first step (set-up) gets the long timeout."""
  watch = train.PeerWatch(str(tmp_path), timeout_seconds=10, long_timeout_seconds=100, process_count=3)
  assert watch.hung({0: "7 train", 1: "5 train"}, now=0) == {}  # process 2 has not published yet: step 0, set-up.
  assert watch.hung({0: "7 train", 1: "5 train", 2: "6 train"}, now=5) == {}
  assert watch.hung({0: "7 train", 1: "5 train", 2: "6 train"}, now=15) == {}  # 2 moved 10 s ago.
  assert watch.hung({0: "7 train", 1: "5 train", 2: "6 train"}, now=16) == {1: (5, 16)}
  watch = train.PeerWatch(str(tmp_path), timeout_seconds=10, long_timeout_seconds=100, process_count=2)
  assert watch.hung({0: "8 save", 1: "8 save"}, now=0) == {}
  assert watch.hung({0: "9 train", 1: "8 save"}, now=50) == {}
  assert watch.hung({0: "9 train", 1: "8 save"}, now=150) == {}
  assert watch.hung({0: "9 train", 1: "8 save"}, now=151) == {1: (8, 151)}
  # Process 0 waited at step 3 for a slow first step of process 1; the count starts again when 1 gets there.
  watch = train.PeerWatch(str(tmp_path), timeout_seconds=10, long_timeout_seconds=100, process_count=2)
  assert watch.hung({0: "3 train", 1: "1 setup"}, now=0) == {}
  assert watch.hung({0: "3 train", 1: "1 setup"}, now=99) == {}
  assert watch.hung({0: "3 train", 1: "3 train"}, now=100) == {}
  assert watch.hung({0: "3 sync", 1: "3 train"}, now=100) == {}
  # Process 0 waits for the device at step 3, process 1 does not: 1 is hung.
  assert watch.hung({0: "3 sync", 1: "3 train"}, now=111) == {1: (3, 11)}
  watch = train.PeerWatch(str(tmp_path), timeout_seconds=10, long_timeout_seconds=100, process_count=2)
  assert watch.hung({0: "4 sync", 1: "4 sync"}, now=0) == {}
  assert watch.hung({0: "4 sync", 1: "4 sync"}, now=11) == {0: (4, 11), 1: (4, 11)}  # both wait: both named.


class FakeService:
  """The two calls of the coordination service's client that PeerWatch.lost makes, over a set of live processes
  and the peer watch's published progress ({process: "step phase"})."""

  def __init__(self, live, progress):
    self.live, self.progress = live, progress

  def get_live_nodes(self, processes):
    return [i for i in processes if i in self.live]

  def key_value_dir_get(self, prefix):
    return [(f"{prefix}progress_{i}", value) for i, value in self.progress.items()]


def test_peer_watch_takes_no_peer_for_lost_or_hung_once_one_is_past_the_last_meeting(tmp_path):
  """A process that published DONE has met every other at the end of the run: a peer gone or still since then
  has finished, not failed. Before that, a peer the service no longer counts is lost."""
  watch = train.PeerWatch(str(tmp_path), timeout_seconds=10, long_timeout_seconds=100, process_count=2)
  watch._client = FakeService(live={0}, progress={0: "16 sync", 1: "16 sync"})
  assert watch.lost() == [1]
  watch._client.progress[1] = f"16 {train.DONE}"
  assert watch.lost() == []
  watch._client.live = {0, 1}
  assert watch.lost() == []
  for now in (0, 1000):
    assert watch.hung({0: "16 sync", 1: f"16 {train.DONE}"}, now=now) == {}
  watch = train.PeerWatch(str(tmp_path), timeout_seconds=10, long_timeout_seconds=100, process_count=2)
  for now in (0, 1000):  # the same still run one phase earlier: process 1, in the final evaluation, is hung.
    hung = watch.hung({0: "16 sync", 1: "16 eval"}, now=now)
  assert hung == {1: (16, 1000)}
