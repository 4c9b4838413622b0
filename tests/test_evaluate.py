"""The evaluator and its command: metrics.json, TensorBoard, predictions, pictures, baselines, threshold tuning,
several evaluations in one command, curves."""
import functools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs.eval import synthetic as synthetic_eval
from mixreorg_jax import checkpoint_io
from mixreorg_jax import evaluator
from mixreorg_jax import seg_metrics
from mixreorg_jax import train_step
from mixreorg_jax import visualize
from mixreorg_jax.data import synthetic
from mixreorg_jax.data import tokenizers
from mixreorg_jax.models import groupvit
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_train_config(synthetic_dir):
  """configs/demo.py made tiny, with the shipped SentencePiece tokenizer and the demo's two evaluations."""
  c = tiny_config()
  c.model.text.vocab_size = 512  # the shipped SentencePiece model's ids fit.
  c.input.synthetic_dir = str(synthetic_dir)
  return c


def write_synthetic_sets(directory, num_images=3):
  synthetic.write_voc_split(str(directory / "voc"), num_images, 64, 0, "voc")
  synthetic.write_voc_split(str(directory / "voc_val"), num_images, 64, 0, "voc_val")


def init_variables(config):
  model = groupvit.GroupViT.from_config(config.model)
  size = config.model.vision.image_size
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                    jnp.zeros((1, config.input.context_length), jnp.int32))


def make_checkpoint(directory):
  """A freshly initialised tiny model as an inference checkpoint with a SentencePiece tokenizer block."""
  config = tiny_train_config("")
  _, variables = init_variables(config)
  checkpoint_io.save_inference_checkpoint(str(directory), variables, config.model, tokenizer=checkpoint_io.tokenizer_info(
      "sentencepiece", "", config.input.context_length))
  return str(directory)


def run_evaluate(*args):
  result = subprocess.run([sys.executable, "-m", "mixreorg_jax.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_evaluate_cli_writes_metrics_predictions_and_pictures(tmp_path):
  synthetic.write_voc_split(str(tmp_path / "voc"), 3, 64, 0, "voc")
  checkpoint = make_checkpoint(tmp_path / "ckpt")
  stdout = run_evaluate(
      "--config=configs/eval/voc_layout.py", f"--checkpoint={checkpoint}", f"--config.data.root={tmp_path / 'voc'}",
      f"--config.save_predictions={tmp_path / 'pred'}", "--config.num_visualizations=2", "--config.short_side=0",
      "--config.window=0", f"--config.output_dir={tmp_path / 'out'}")
  assert "bg_threshold 0.95" in stdout and "mIoU" in stdout
  out = tmp_path / "out"  # config.output_dir is where the results go.
  assert not os.path.exists(os.path.join(checkpoint, "eval"))
  with open(out / "metrics.json") as f:
    metrics = json.load(f)
  assert {"mIoU", "per_class_iou", "pixel_acc", "mean_acc", "num_images", "protocol"} <= set(metrics)
  assert metrics["num_images"] == 3 and 0 <= metrics["pixel_acc"] <= 100
  assert list(metrics["per_class_iou"]) == list(synthetic.CLASS_NAMES)
  assert metrics["protocol"]["window"] == 0 and metrics["protocol"]["data"]["root"] == str(tmp_path / "voc")
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
  assert len(os.listdir(out / "visualizations")) == 2
  truth = sorted(os.listdir(tmp_path / "voc" / "SegmentationClass"))
  assert sorted(os.listdir(tmp_path / "pred")) == truth
  pred = Image.open(tmp_path / "pred" / truth[0])
  assert pred.mode == "P" and pred.size == Image.open(tmp_path / "voc" / "SegmentationClass" / truth[0]).size


def test_evaluate_cli_runs_every_evaluation_of_a_config_in_one_command(tmp_path):
  """configs/demo.py's two evaluations on a checkpoint: tuning (with its threshold sweep), then held-out, also at
  the threshold best on tuning; the default output directory is <checkpoint>/eval/<name>/."""
  write_synthetic_sets(tmp_path / "synth", 2)
  checkpoint = make_checkpoint(tmp_path / "ckpt")
  stdout = run_evaluate("--config=configs/demo.py", f"--checkpoint={checkpoint}",
                        f"--config.input.synthetic_dir={tmp_path / 'synth'}", "--config.evals.heldout.baselines=False",
                        "--config.evals.heldout.image_recognition=False", "--config.evals.heldout.num_visualizations=0")
  assert stdout.index("--- tuning") < stdout.index("--- heldout")
  with open(os.path.join(checkpoint, "eval", "tuning", "metrics.json")) as f:
    tuning = json.load(f)
  with open(os.path.join(checkpoint, "eval", "heldout", "metrics.json")) as f:
    heldout = json.load(f)
  assert tuning["protocol"]["data"]["root"] == str(tmp_path / "synth" / "voc_val")
  assert heldout["protocol"]["data"]["root"] == str(tmp_path / "synth" / "voc")
  assert heldout["tuned_bg_threshold"] == tuning["best_bg_threshold"]


def test_evaluations_of_a_train_config_tune_the_threshold_and_report_baselines(tmp_path):
  write_synthetic_sets(tmp_path / "synth")
  config = tiny_train_config(tmp_path / "synth")
  config.evals.tuning.data.max_images = config.evals.heldout.data.max_images = 2
  config.evals.heldout.num_visualizations = 2
  model = groupvit.GroupViT.from_config(config.model)
  # The parameters the run would start from: the untrained baseline must then score exactly the same.
  variables = jax.jit(functools.partial(train_step.init_variables, config, model))(jax.random.key(config.seed))
  state = types.SimpleNamespace(params=variables["params"], batch_stats=variables["batch_stats"])
  workdir = tmp_path / "work"
  evaluator.check_evals(config)
  evaluations = evaluator.Evaluations.for_training(config, model, str(workdir),
                                                   evaluator.initial_variables(config, model, state))
  assert list(evaluations.evaluators) == ["tuning", "heldout"] and not evaluations.due(20)
  results = evaluations.run(variables, step=20, final=True)
  h = "eval/heldout/"
  assert {f"{h}mIoU", f"{h}pixel_acc", f"{h}chance_mIoU", f"{h}untrained_mIoU", "eval/tuning/mIoU"} <= set(results)
  assert not {"eval/tuning/chance_mIoU", "eval/tuning/untrained_mIoU"} & set(results)  # no baselines asked there.
  assert all(np.isfinite(v) for k, v in results.items() if "per_class/" not in k)
  # Per-class IoU of every class; nan for a class absent from both the 2 images and the prediction.
  assert {f"{h}per_class/{name}" for name in synthetic.CLASS_NAMES} <= set(results)
  assert results[f"{h}untrained_mIoU"] == pytest.approx(results[f"{h}mIoU"], abs=1e-6)
  assert 1 <= results[f"{h}groups_per_image"] <= config.model.vision.num_output_groups[-1]
  # The tuning split's best background threshold, applied to the held-out set.
  assert results[f"{h}tuned_bg_threshold"] == results["eval/tuning/best_bg_threshold"]
  assert results["eval/tuning/best_bg_mIoU"] >= results["eval/tuning/mIoU"] - 1e-9  # 0.5 is one of the thresholds
  assert results[f"{h}tuned_bg_threshold"] in seg_metrics.DEFAULT_BG_THRESHOLDS
  tuned = evaluator.enabled_evals(config)["heldout"]
  tuned.bg_threshold = results[f"{h}tuned_bg_threshold"]
  held_out = evaluator.run_protocol(model, variables, tokenizers.make_tokenizer(config.input), tuned, progress=False)
  assert results[f"{h}tuned_bg_mIoU"] == pytest.approx(held_out["mIoU"], abs=1e-9)
  assert {f"{h}tuned_bg_per_class/{name}" for name in synthetic.CLASS_NAMES} <= set(results)
  with open(workdir / "eval" / "heldout" / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["num_images"] == 2 and metrics["step"] == 20
  assert metrics["chance_mIoU"] == pytest.approx(results[f"{h}chance_mIoU"])
  assert metrics["protocol"]["bg_threshold_from"] == "tuning"
  assert len(os.listdir(workdir / "eval" / "heldout" / "visualizations")) == 2
  assert not os.path.exists(workdir / "eval" / "tuning" / "visualizations")


def test_evaluations_are_on_with_data_and_checked_before_anything_runs(tmp_path):
  write_synthetic_sets(tmp_path / "synth")
  config = tiny_train_config(tmp_path / "synth")
  evals = evaluator.enabled_evals(config)
  assert evals["tuning"].data.root == str(tmp_path / "synth" / "voc_val")
  # Both splits with the protocol of configs/eval/synthetic.py, which `evaluate` uses on an exported checkpoint.
  assert evals["tuning"].short_side == evals["heldout"].short_side == synthetic_eval.SHORT_SIDE > 64
  assert evals["heldout"].data.root == str(tmp_path / "synth" / "voc")
  config.evals.tuning.synthetic = ""  # no data: off, and held-out has no threshold to take.
  assert list(evaluator.enabled_evals(config)) == ["heldout"]
  with pytest.raises(ValueError, match=r"config\.evals\.heldout\.bg_threshold_from='tuning'"):
    evaluator.check_evals(config)
  config.evals.tuning.data.root = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"config\.evals\.tuning\.data\.root"):
    evaluator.check_evals(config)
  config.evals.tuning.data.root, config.evals.tuning.synthetic = "", "voc_val"
  config.input.synthetic_dir = str(tmp_path / "not_generated")
  with pytest.raises(FileNotFoundError, match=r"config\.evals\.(heldout|tuning)\.synthetic="):
    evaluator.check_evals(config)
  config.lock()
  with pytest.raises(AttributeError, match="every_steps"):  # a typo in an eval key.
    config.evals.tuning.evry_steps = 5


def test_plot_training_curves_skips_missing_keys(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": s, "train/loss": 1.0 / s, "train/loss_orig": 0.5 / s} for s in (1, 2, 3)]
  lines.append({"step": 3, "eval/tuning/mIoU": 10.0, "eval/heldout/mIoU": 9.0})
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  out = visualize.plot_training_curves(str(path), str(tmp_path / "curves.png"))
  assert Image.open(out).size[0] > 100
  with pytest.raises(ValueError, match="nothing to plot"):
    visualize.plot_training_curves(str(path), str(tmp_path / "x.png"), keys=("train/nothing",))


def test_threshold_sweep_is_the_protocol_at_every_threshold(tmp_path):
  # A one-window protocol: each point of the sweep must be the protocol's own mIoU at that threshold, although
  # the background rule's cap is the best score of any group, those that own no pixel included.
  write_synthetic_sets(tmp_path / "synth")
  config = tiny_train_config(tmp_path / "synth")
  tuning = evaluator.enabled_evals(config)["tuning"]
  model, variables = init_variables(config)
  tokenizer = tokenizers.make_tokenizer(config.input)
  thresholds = (0.1, 0.5, 0.9)
  swept = evaluator.run_protocol(model, variables, tokenizer, tuning, progress=False, bg_thresholds=thresholds)
  for t, miou in zip(thresholds, swept["mIoU_by_bg_threshold"]):
    at_t = tuning.copy_and_resolve_references()
    at_t.bg_threshold = t
    assert miou == pytest.approx(evaluator.run_protocol(model, variables, tokenizer, at_t, progress=False)["mIoU"],
                                 abs=1e-9), t
  best = int(np.nanargmax(swept["mIoU_by_bg_threshold"]))
  assert swept["best_bg_threshold"] == thresholds[best]
  assert swept["best_bg_mIoU"] == swept["mIoU_by_bg_threshold"][best]
