"""End to end: the real training command pretrains the demo on synthetic captions alone, then segments the
held-out set zero-shot from class names, well above the chance and untrained-model baselines of the same run.
"""
import math
import os
import subprocess
import sys

import pytest

from tests import test_train_common as common

E2E_STEPS = 900  # the demo's length: ~9.5 minutes on a 2-core CPU without AVX-512, ~4 with it
MIOU_MARGIN = 4.0  # mIoU points above each baseline


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return common.synthetic_data(tmp_path_factory)


@pytest.mark.slow
def test_caption_pretraining_learns_zero_shot_segmentation_end_to_end(synthetic_dir, tmp_path):
  workdir = str(tmp_path / "workdir")
  # One real device, XLA's default optimisation and huge-page malloc, as the README runs the demo (not the tests'
  # 8 fake devices).
  env = dict(common.SUBPROCESS_ENV, XLA_FLAGS="", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
  cmd = [sys.executable, "-m", "mixreorg_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
         f"--config.input.synthetic_dir={synthetic_dir}", f"--config.total_steps={E2E_STEPS}",
         "--config.log_steps=50", f"--config.ckpt_steps={E2E_STEPS}",
         "--config.evals.tuning.data.max_images=100", "--config.evals.heldout.data.max_images=100"]
  with open(os.path.join(str(tmp_path), "log.txt"), "w") as log:
    subprocess.run(cmd, cwd=common.REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1200)
  results = {}
  for row in common.read_metrics(workdir):
    results.update({k[len("eval/heldout/"):]: v for k, v in row.items() if k.startswith("eval/heldout/")})
  for key in ("mIoU", "chance_mIoU", "untrained_mIoU", "pixel_acc"):
    assert math.isfinite(results[key]) and 0 <= results[key] <= 100, (key, results)
  # Segmentation from class names alone, well above both baselines computed in the same run (the demo at seed 0
  # scored 21.4 held-out mIoU on all 500 images against 10.2 chance and 7.9 untrained; at seed 1 it scored 12.5,
  # so runs are not yet robust across seeds: this checks seed 0, the README's command; on 100 images it scored
  # 21.4 against 10.2 and 7.7, a margin of 11 points where 4 are asked).
  assert results["mIoU"] > results["chance_mIoU"] + MIOU_MARGIN, results
  assert results["mIoU"] > results["untrained_mIoU"] + MIOU_MARGIN, results
  assert results["groups_per_image"] > 2.0, results  # no collapse onto one segment per image
  # Class names alone pick a class that is in the image far more often than chance.
  assert results["image_top1"] > 2 * results["image_top1_chance"], results
  losses = common.losses(workdir)
  assert losses[E2E_STEPS] < losses[50], losses
  assert os.path.exists(os.path.join(workdir, "training_curves.png"))
