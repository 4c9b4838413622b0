"""The evaluate command and the trainer's hook: metrics.json, TensorBoard, predictions, examples, chance, curves."""
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

from mixreorg_jax import checkpoint_io
from mixreorg_jax import evaluate
from mixreorg_jax import seg_metrics
from mixreorg_jax import train_step
from mixreorg_jax.data import synthetic
from mixreorg_jax.data import tokenizers
from mixreorg_jax.models import groupvit
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_train_config(synthetic_dir):
  """configs/demo.py made tiny, with the shipped SentencePiece tokenizer and the VOC-layout eval attached."""
  c = tiny_config()
  c.model.text.vocab_size = 512  # the shipped SentencePiece model's ids fit.
  c.input.synthetic_dir = str(synthetic_dir)
  c.eval.config = os.path.join(REPO, "configs/eval/voc_layout.py")
  return c


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


def test_evaluate_cli_writes_metrics_predictions_and_pictures(tmp_path):
  synthetic.write_voc_split(str(tmp_path / "voc"), 3, 64, 0, "voc")
  checkpoint = make_checkpoint(tmp_path / "ckpt")
  result = subprocess.run(
      [sys.executable, "-m", "mixreorg_jax.evaluate", "--config=configs/eval/voc_layout.py",
       f"--checkpoint={checkpoint}", f"--config.data.root={tmp_path / 'voc'}",
       f"--config.save_predictions={tmp_path / 'pred'}", "--config.num_visualizations=2", "--config.short_side=0",
       "--config.window=0"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "bg_threshold 0.95" in result.stdout and "mIoU" in result.stdout
  out = os.path.join(checkpoint, "eval", "voc_layout")
  with open(os.path.join(out, "metrics.json")) as f:
    metrics = json.load(f)
  assert {"mIoU", "per_class_iou", "pixel_acc", "mean_acc", "num_images", "protocol"} <= set(metrics)
  assert metrics["num_images"] == 3 and 0 <= metrics["pixel_acc"] <= 100
  assert list(metrics["per_class_iou"]) == list(synthetic.CLASS_NAMES)
  assert metrics["protocol"]["window"] == 0 and metrics["protocol"]["data"]["root"] == str(tmp_path / "voc")
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
  assert len(os.listdir(os.path.join(out, "visualizations"))) == 2
  truth = sorted(os.listdir(tmp_path / "voc" / "SegmentationClass"))
  assert sorted(os.listdir(tmp_path / "pred")) == truth
  pred = Image.open(tmp_path / "pred" / truth[0])
  assert pred.mode == "P" and pred.size == Image.open(tmp_path / "voc" / "SegmentationClass" / truth[0]).size


def test_evaluate_train_state_returns_finite_metrics_and_baselines(tmp_path):
  synthetic.write_voc_split(str(tmp_path / "synth" / "voc"), 3, 64, 0, "voc")
  synthetic.write_voc_split(str(tmp_path / "synth" / "voc_val"), 3, 64, 0, "voc_val")
  config = tiny_train_config(tmp_path / "synth")
  config.eval.max_images = 2
  model = groupvit.GroupViT.from_config(config.model)
  # The parameters the run would start from: the untrained baseline must then score exactly the same.
  variables = jax.jit(functools.partial(train_step.init_variables, config, model))(jax.random.key(config.seed))
  state = types.SimpleNamespace(params=variables["params"], batch_stats=variables["batch_stats"])
  workdir = tmp_path / "work"
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    for step in (10, 20):
      f.write(json.dumps({"step": step, "train/loss": 3.0 / step, "train/loss_seg": 0.5, "train/seg_acc": 0.6}) + "\n")
  results = evaluate.evaluate_train_state(config, model, state, str(workdir), step=20, final=True)
  assert {"eval/mIoU", "eval/pixel_acc", "eval/chance_mIoU", "eval/untrained_mIoU"} <= set(results)
  assert all(np.isfinite(v) for k, v in results.items() if "per_class/" not in k)
  # Per-class IoU of every class; nan for a class absent from both the 2 images and the prediction.
  assert {f"eval/per_class/{name}" for name in synthetic.CLASS_NAMES} <= set(results)
  assert results["eval/untrained_mIoU"] == pytest.approx(results["eval/mIoU"], abs=1e-6)
  assert 1 <= results["eval/groups_per_image"] <= config.model.vision.num_output_groups[-1]
  # The tuning split's best background threshold, applied to the held-out set.
  assert results["eval/tuned_bg_threshold"] in seg_metrics.DEFAULT_BG_THRESHOLDS
  tuned = evaluate.eval_config_for_training(config, final=True)
  tuned.bg_threshold = results["eval/tuned_bg_threshold"]
  held_out = evaluate.run_protocol(model, variables, tokenizers.make_tokenizer(config.input), tuned, progress=False)
  assert results["eval/tuned_bg_mIoU"] == pytest.approx(held_out["mIoU"], abs=1e-9)
  assert {f"eval/tuned_bg_per_class/{name}" for name in synthetic.CLASS_NAMES} <= set(results)
  with open(workdir / "eval" / "voc_layout" / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["num_images"] == 2 and metrics["step"] == 20
  assert metrics["chance_mIoU"] == pytest.approx(results["eval/chance_mIoU"])
  assert len(os.listdir(workdir / "examples")) == 2
  Image.open(workdir / "training_curves.png").verify()


def test_plot_training_curves_skips_missing_keys(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": s, "train/loss": 1.0 / s, "train/loss_orig": 0.5 / s} for s in (1, 2, 3)]
  lines.append({"step": 3, "eval/mIoU": 10.0})
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  out = evaluate.plot_training_curves(str(path), str(tmp_path / "curves.png"))
  assert Image.open(out).size[0] > 100
  with pytest.raises(ValueError, match="nothing to plot"):
    evaluate.plot_training_curves(str(path), str(tmp_path / "x.png"), keys=("train/nothing",))


def test_eval_config_for_training_applies_overrides_and_synthetic_default(tmp_path):
  config = tiny_train_config(tmp_path / "synth")
  config.eval.config += ":full"
  assert len(evaluate.eval_config_for_training(config, final=False).prompt_templates) == 80
  assert evaluate.eval_config_for_training(config, final=False).data.root == str(tmp_path / "synth" / "voc_val")
  synthetic_eval = evaluate.eval_config_for_training(config, final=True)
  assert synthetic_eval.data.root == str(tmp_path / "synth" / "voc") and synthetic_eval.short_side == 0
  config.eval.data_root, config.eval.max_images = "/data/x", 7
  eval_config = evaluate.eval_config_for_training(config, final=True)
  assert (eval_config.data.root, eval_config.data.max_images, eval_config.short_side) == ("/data/x", 7, 448)
  with pytest.raises(FileNotFoundError, match="configs/eval"):
    evaluate.load_eval_config("configs/eval/nope.py")
