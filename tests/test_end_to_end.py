"""End to end: the real training command pretrains on synthetic captions alone, then evaluates zero-shot on the
held-out set.

Pixel-level zero-shot segmentation of the demo does not yet beat the chance baseline at the training lengths
that fit a CI run (see README, "The demo"); what a few minutes of caption-only pretraining does learn, and what is
asserted here, is image-level zero-shot recognition from class names.
"""
import math
import os
import subprocess
import sys

import pytest

from tests import test_train_common as common

E2E_STEPS = 200  # ~4 minutes of the demo model on 2 CPU cores, evaluation included


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return common.synthetic_data(tmp_path_factory)


@pytest.mark.slow
def test_caption_pretraining_learns_zero_shot_recognition_end_to_end(synthetic_dir, tmp_path):
  workdir = str(tmp_path / "workdir")
  # One real device and XLA's default optimisation, as a user runs the demo (not the tests' 8 fake devices).
  env = dict(common.SUBPROCESS_ENV, XLA_FLAGS="")
  cmd = [sys.executable, "-m", "mixreorg_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
         f"--config.input.synthetic_dir={synthetic_dir}", f"--config.total_steps={E2E_STEPS}",
         "--config.log_steps=50", f"--config.ckpt_steps={E2E_STEPS}", "--config.eval.max_images=100"]
  with open(os.path.join(str(tmp_path), "log.txt"), "w") as log:
    subprocess.run(cmd, cwd=common.REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1200)
  results = {}
  for row in common.read_metrics(workdir):
    results.update({k: v for k, v in row.items() if k.startswith("eval/")})
  for key in ("eval/mIoU", "eval/chance_mIoU", "eval/untrained_mIoU", "eval/pixel_acc"):
    assert math.isfinite(results[key]) and 0 <= results[key] <= 100, (key, results)
  # Class names alone pick a class that is in the image far more often than chance (measured on all 500 held-out
  # images: 74% vs 23%).
  assert results["eval/image_top1"] > 2 * results["eval/image_top1_chance"], results
  losses = common.losses(workdir)
  assert losses[E2E_STEPS] < losses[50], losses
  assert os.path.exists(os.path.join(workdir, "training_curves.png"))
