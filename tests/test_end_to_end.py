"""End to end: the real training command pretrains the demo on synthetic captions alone, then segments the
held-out set zero-shot from class names, above the chance and untrained-model baselines of the same run.
"""
import math
import os
import subprocess
import sys

import pytest

from configs import demo
from tests import test_train_common as common

E2E_STEPS = demo.get_config().total_steps  # the demo's own length: shorter runs do not yet learn to segment.
# The demo's runs are chaotic: another CPU kind or another thread count is another trajectory, so the test's run is
# a fresh draw whatever its seed. Held-out (all 500 images, the demo's own evaluation at a short side of 192), the
# demo config (data version 3) scored at seeds 0-4 on a 2-core AMD EPYC with AVX-512, one core each, above the
# untrained model by 30.7, 21.3, 35.3, 24.7, 28.2 mIoU and above chance by 24.7, 16.1, 29.6, 17.8, 24.3; its best
# object class scored 72.9, 54.7, 84.0, 63.1, 72.3 IoU, with 6.5-7.6 groups per image. This test itself (2 threads,
# same CPU) at seeds 3, 0, 1: above the untrained model by 35.1, 32.8, 19.2, above chance by 28.1, 27.2, 14.5, best
# class 67.7, 71.6, 60.3, 6.2-7.3 groups per image; seed 3 took 4.1 minutes alone, data generation excluded. The
# thresholds sit 8.5-20 points under the smallest of those margins. CI runs one seed; MIXREORG_E2E_SEED=S runs the
# test at seed S.
E2E_SEED = int(os.environ.get("MIXREORG_E2E_SEED", "3"))
MIOU_OVER_UNTRAINED = 10.0  # mIoU points above the untrained model (the runs' initial parameters)
MIOU_OVER_CHANCE = 6.0  # mIoU points above chance (every patch on a random group)
BEST_OBJECT_IOU = 40.0  # some object class segmented from its name alone at least this well


def _report(results: dict) -> str:
  per_class = ", ".join(f"{k[len('per_class/'):]} {v:.1f}" for k, v in results.items() if k.startswith("per_class/"))
  scalars = ", ".join(f"{k} {v:.4g}" for k, v in sorted(results.items()) if "per_class/" not in k)
  return f"{scalars}; per-class IoU: {per_class}"


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return common.synthetic_data(tmp_path_factory)


@pytest.mark.slow
def test_caption_pretraining_learns_zero_shot_segmentation_end_to_end(synthetic_dir, tmp_path):
  workdir = str(tmp_path / "workdir")
  # One real device, XLA's default optimisation and huge-page malloc, as the README runs the demo (not the tests'
  # 8 fake devices). The tuning split only picks the threshold of tuned_bg_mIoU, which is not asserted.
  env = dict(common.SUBPROCESS_ENV, XLA_FLAGS="", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
  cmd = [sys.executable, "-m", "mixreorg_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
         f"--config.input.synthetic_dir={synthetic_dir}", f"--config.seed={E2E_SEED}",
         f"--config.input.seed={E2E_SEED}", "--config.log_steps=50", f"--config.ckpt_steps={E2E_STEPS}",
         "--config.evals.tuning.data.max_images=100"]
  with open(os.path.join(str(tmp_path), "log.txt"), "w") as log:
    subprocess.run(cmd, cwd=common.REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1200)
  results = {}
  for row in common.read_metrics(workdir):
    results.update({k[len("eval/heldout/"):]: v for k, v in row.items() if k.startswith("eval/heldout/")})
  report = _report(results)
  for key in ("mIoU", "chance_mIoU", "untrained_mIoU", "pixel_acc"):
    assert math.isfinite(results[key]) and 0 <= results[key] <= 100, (key, report)
  # Segmentation from class names alone, above both baselines computed in the same run: the untrained model, and
  # the trained one with every patch on a random group (so the learned groups add to the naming).
  assert results["mIoU"] > results["untrained_mIoU"] + MIOU_OVER_UNTRAINED, report
  assert results["mIoU"] > results["chance_mIoU"] + MIOU_OVER_CHANCE, report
  objects = [v for k, v in results.items() if k.startswith("per_class/") and k != "per_class/background"]
  assert max(objects) >= BEST_OBJECT_IOU, report
  assert results["groups_per_image"] > 1.5, report  # no collapse onto one segment per image
  # Class names alone pick a class that is in the image far more often than chance.
  assert results["image_top1"] > 2 * results["image_top1_chance"], report
  losses = common.losses(workdir)
  assert losses[E2E_STEPS] < losses[50], losses
  assert os.path.exists(os.path.join(workdir, "training_curves.png"))
