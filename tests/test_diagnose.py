"""tools/diagnose: grouping against naming, on models whose answers are known, and the command's files."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mixreorg_jax.data import synthetic
from mixreorg_jax.tools import diagnose
from tests.test_evaluate import REPO, make_checkpoint

CLASSES = ("background", "a", "b", "c")


def scene(seed=0, size=16):
  """A label map with background and two square objects of distinct classes. -> int [H, W]."""
  rng = np.random.default_rng(seed)
  label = np.zeros((size, size), np.int64)
  a, b = rng.choice([1, 2, 3], 2, replace=False)
  label[2:7, 2:7] = a
  label[9:14, 8:15] = b
  return label


def scores_naming(label, names, object_score=0.9, background_score=0.3):
  """Foreground scores [C-1, H, W] that call every object pixel of class c `names[c]` with object_score, and put
  background_score on class 1 at background pixels."""
  scores = np.zeros((len(CLASSES) - 1,) + label.shape, np.float32)
  for c in range(1, len(CLASSES)):
    scores[names[c] - 1][label == c] = object_score
  scores[0][label == 0] = background_score
  return scores


def run(examples, threshold=0.5, thresholds=(0.2, 0.5, 0.95)):
  d = diagnose.Diagnosis(CLASSES, thresholds, threshold)
  for label, scores, groups in examples:
    d.add(label, scores, groups)
  return d.summary()


def test_a_perfect_model_groups_and_names_everything():
  labels = [scene(s) for s in range(4)]
  s = run([(lab, scores_naming(lab, {1: 1, 2: 2, 3: 3}), lab) for lab in labels])
  assert s["mIoU"] == pytest.approx(100) and s["oracle_mIoU"] == pytest.approx(100)
  assert s["object_groups"] == 8 and s["object_groups_named_right"] == pytest.approx(100)
  assert s["background_false_positive_rate"] == 0
  assert diagnose.verdict(s).startswith("neither")


def test_right_groups_with_wrong_names_is_a_naming_failure():
  labels = [scene(s) for s in range(4)]
  swapped = {1: 2, 2: 3, 3: 1}  # every object called the next class
  s = run([(lab, scores_naming(lab, swapped), lab) for lab in labels])
  assert s["oracle_mIoU"] == pytest.approx(100)
  assert s["object_groups_named_right"] == 0
  iou_background = s["per_class_iou"]["background"]
  assert iou_background == pytest.approx(100) and s["mIoU"] == pytest.approx(25)  # only the background is right
  assert diagnose.verdict(s).startswith("naming")


def test_one_group_per_image_is_a_grouping_failure():
  labels = [scene(s) for s in range(4)]
  s = run([(lab, scores_naming(lab, {1: 1, 2: 2, 3: 3}), np.zeros_like(lab)) for lab in labels])
  # The single group is mostly background: the oracle labels every pixel background.
  assert s["oracle_mIoU"] == pytest.approx(100 * (16 * 16 - 25 - 35) / (16 * 16) / 4, abs=1e-6)
  assert s["object_groups"] == 0
  assert diagnose.verdict(s).startswith("grouping")


def test_background_false_positives_and_the_threshold_curve():
  lab = scene(0)
  scores = scores_naming(lab, {1: 1, 2: 2, 3: 3}, object_score=0.9, background_score=0.3)
  s = run([(lab, scores, lab)], threshold=0.2, thresholds=(0.2, 0.5, 0.95))
  # At 0.2 the background pixels (score 0.3 on class 1) become class 1; at 0.5 they are background again; at
  # 0.95 the threshold is capped by the image's best score 0.9, so the objects stay objects.
  assert s["background_false_positive_rate"] == pytest.approx(100)
  assert s["mIoU_by_threshold"][1] == pytest.approx(100) and s["mIoU_by_threshold"][2] == pytest.approx(100)
  assert s["mIoU_by_threshold"][0] == pytest.approx(s["mIoU"]) and s["mIoU"] < 60
  assert s["best_threshold"] == 0.5



def test_per_class_tells_a_weakly_scored_class_from_a_misnamed_and_a_badly_grouped_one():
  label = np.zeros((16, 16), np.int64)
  label[2:7, 2:7], label[9:14, 8:15], label[1:4, 10:14] = 1, 2, 3
  scores = np.zeros((3, 16, 16), np.float32)
  scores[0][label == 1] = 0.3  # "a": named right, but under the threshold
  scores[1][label == 2] = 0.9  # "b": named right and sure
  scores[0][label == 3] = 0.9  # "c": called "a"
  scores[0][label == 0] = 0.1
  groups = label.copy()
  groups[9:14, 4:8] = 2  # b's group also takes 20 background pixels: the oracle calls them b
  per_class = run([(label, scores, groups)], threshold=0.5)["per_class"]
  assert set(per_class) == {"a", "b", "c"}
  a, b, c = per_class["a"], per_class["b"], per_class["c"]
  assert a["named_right_unthresholded"] == 100 and a["called_background"] == 100 and a["iou"] == 0
  assert a["oracle_iou"] == pytest.approx(100)
  assert b["named_right_unthresholded"] == 100 and b["called_background"] == 0 and b["iou"] == pytest.approx(100)
  assert b["oracle_iou"] == pytest.approx(100 * 35 / (35 + 20))
  assert c["named_right_unthresholded"] == 0 and c["called_background"] == 0 and c["iou"] == 0
  assert a["main_group_purity"] == 100 and c["main_group_purity"] == 100
  assert b["main_group_purity"] == pytest.approx(100 * 35 / (35 + 20))
  report = diagnose.format_report(dict(run([(label, scores, groups)]), dataset="x", verdict="v"))
  assert "named right, no threshold" in report and report.splitlines()[-1].split()[0] == "c"


def test_main_group_purity_is_the_group_holding_most_of_the_class():
  label = np.zeros((8, 8), np.int64)
  label[0:2, 0:4] = 1  # class 1: 8 pixels, 6 in group 1 and 2 in group 2
  label[4:8, 4:8] = 2  # class 2: 16 pixels, all in group 3 with 16 background pixels
  groups = np.zeros((8, 8), np.int64)
  groups[0:2, 0:3] = 1
  groups[0:2, 3:4] = 2
  groups[2:4, 3:4] = 2  # group 2: 2 pixels of class 1 and (once row 3 is group 4) 1 of background
  groups[4:8, 0:8] = 3
  groups[3, :] = 4
  label[3, :] = 255  # group 4 is unlabelled: it counts nowhere
  purity = diagnose.main_group_purity(label, groups, 4)
  assert set(purity) == {1, 2}  # class 3 is absent
  assert purity[1] == pytest.approx(1.0) and purity[2] == pytest.approx(0.5)
  d = diagnose.Diagnosis(CLASSES, (0.5,), 0.5)
  # Image 2: class 1's main group is group 0, which it shares with 15 background pixels.
  for groups_of_image in (groups, np.where(groups == 1, 0, groups)):
    d.add(label, scores_naming(label, {1: 1, 2: 2, 3: 3}), groups_of_image)
  per_class = d.summary()["per_class"]
  assert per_class["a"]["main_group_purity"] == pytest.approx(100 * (1.0 + 6 / (6 + 15)) / 2)
  assert per_class["b"]["main_group_purity"] == pytest.approx(50)


def test_patch_grid_ceiling_gives_every_patch_its_majority_label():
  label = np.zeros((8, 8), np.int64)
  label[0:3, 0:3] = 1  # 9 pixels: 9 of cell 0's 16 -> cell 0 is class 1 and takes 7 background pixels
  label[4:6, 4:8] = 2  # 8 pixels: half of cell 3 -> a tie, argmax takes the background
  assert np.array_equal(diagnose.patch_grid((5, 6), 4), [[0, 0, 0, 0, 1, 1]] * 4 + [[2, 2, 2, 2, 3, 3]])
  d = diagnose.Diagnosis(CLASSES, (0.5,), 0.5, patch_size=4)
  d.add(label, scores_naming(label, {1: 1, 2: 2, 3: 3}), label)
  s = d.summary()
  iou_background = (64 - 16 - 8) / (64 - 9)  # right: 40 pixels; predicted: 48, true: 47 -> union 55
  assert s["patch_grid_ceiling_mIoU"] == pytest.approx(100 * (iou_background + 9 / 16 + 0) / 3)
  assert s["oracle_mIoU"] == pytest.approx(100)  # the groups are the labels themselves
  assert diagnose.Diagnosis(CLASSES, (0.5,), 0.5).summary()["patch_grid_ceiling_mIoU"] is None


def test_patch_grid_ceiling_follows_the_protocols_resize():
  # 6 px resized to 9 with 3 px patches: pixel centres 0.75, 2.25, 3.75, ... -> rows 0, 0, 1, 1, 2, 2 of 3 cells.
  assert np.array_equal(diagnose.patch_grid((6, 6), 3, (9, 9))[:, 0], [0, 0, 3, 3, 6, 6])
  assert np.array_equal(diagnose.patch_grid((6, 6), 3, (9, 9))[0], [0, 0, 1, 1, 2, 2])
  assert np.array_equal(diagnose.patch_grid((4, 4), 4, (8, 8)), [[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2)
  label = np.zeros((8, 8), np.int64)
  label[0:2, 0:2] = 1
  label[4:6, 4:8] = 2  # both on the 2 px grid that 4 px patches of the image resized to 16 make, not on 4 px

  def ceiling(short_side):
    d = diagnose.Diagnosis(CLASSES, (0.5,), 0.5, patch_size=4, short_side=short_side)
    d.add(label, scores_naming(label, {1: 1, 2: 2, 3: 3}), label)
    return d.summary()["patch_grid_ceiling_mIoU"]

  assert ceiling(16) == pytest.approx(100)
  assert ceiling(0) < 50  # at the native size class 1 has 4 of a 16-pixel cell and class 2 half of one


def test_nearest_prompt_is_the_other_class_with_the_highest_cosine():
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  emb = unit(np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8]]))
  nearest = diagnose.nearest_prompts(emb, ("a", "b", "c"))
  assert nearest["a"] == ("b", pytest.approx(0.8))  # itself (cos 1) never counts
  assert nearest["b"] == ("a", pytest.approx(0.8))
  assert nearest["c"] == ("b", pytest.approx(0.36))


def test_oracle_and_named_groups_ignore_unlabelled_pixels():
  lab = scene(1)
  lab[0, :] = 255
  groups = lab.copy()
  groups[lab == 255] = 7  # a group made only of ignored pixels is neither scored nor counted
  pred = lab.copy()
  pred[lab == 255] = 0
  assert np.array_equal(diagnose.oracle_labels(lab, groups, 4)[lab != 255], lab[lab != 255])
  assert diagnose.object_groups_named(lab, pred, groups, 4) == (2, 2)


@pytest.mark.slow
def test_diagnose_command_writes_report_and_pictures(tmp_path):
  synthetic.write_voc_split(str(tmp_path / "voc"), 3, 64, 0, "voc_val")
  checkpoint = make_checkpoint(tmp_path / "ckpt")
  result = subprocess.run(
      [sys.executable, "-m", "mixreorg_jax.tools.diagnose", "--config=configs/eval/synthetic.py",
       f"--checkpoint={checkpoint}", f"--config.data.root={tmp_path / 'voc'}", "--thresholds=0.1,0.5,0.9",
       f"--output_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "oracle mIoU" in result.stdout and "verdict:" in result.stdout and "nearest prompt (cos)" in result.stdout
  with open(tmp_path / "out" / "diagnose.json") as f:
    report = json.load(f)
  assert report["num_images"] == 3 and report["thresholds"] == [0.1, 0.5, 0.9]
  assert len(report["mIoU_by_threshold"]) == 3 and 0 <= report["oracle_mIoU"] <= 100
  assert 0 < report["patch_grid_ceiling_mIoU"] <= 100
  assert np.asarray(report["confusion"]).sum() == 3 * 64 * 64
  for name, row in report["per_class"].items():
    assert row["nearest_prompt"] != name and -1 <= row["nearest_prompt_cos"] <= 1
  for name in ("confusion.png", "bg_threshold.png"):
    assert os.path.getsize(tmp_path / "out" / name) > 1000


def test_diagnose_needs_a_background_class():
  config = ml_collections.ConfigDict({"with_background": False})
  with pytest.raises(ValueError, match="with_background"):
    diagnose.diagnose_checkpoint("unused", config)
