"""The segment command: an openable PNG with the overlay and the groups; segment_image's arrays for downstream use."""
import subprocess
import sys

import numpy as np
from PIL import Image

from mixreorg_jax import inference
from mixreorg_jax import segment
from mixreorg_jax import zeroshot
from mixreorg_jax.data import synthetic
from tests.test_evaluate import REPO, make_checkpoint


def test_segment_cli_writes_overlay_and_groups_png(tmp_path):
  checkpoint = make_checkpoint(tmp_path / "ckpt")
  image = np.random.default_rng(0).integers(0, 255, (48, 40, 3), np.uint8)
  Image.fromarray(image).save(tmp_path / "in.jpg")
  result = subprocess.run(
      [sys.executable, "-m", "mixreorg_jax.segment", f"--checkpoint={checkpoint}", f"--image={tmp_path / 'in.jpg'}",
       "--classes=circle, square,star", f"--output={tmp_path / 'out.png'}", "--short_side=0", "--window=0"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "classes found:" in result.stdout
  with Image.open(tmp_path / "out.png") as picture:
    picture.load()
    assert picture.mode == "RGB" and picture.width > 2 * 40 and picture.height >= 48


def test_segment_file_without_classes_draws_image_and_groups(tmp_path):
  checkpoint = make_checkpoint(tmp_path / "ckpt")
  Image.fromarray(np.full((32, 36, 3), 128, np.uint8)).save(tmp_path / "flat.png")
  output, result = segment.segment_file(checkpoint, str(tmp_path / "flat.png"), [],
                                        protocol=zeroshot.Protocol(short_side=0, window=0, stride=0))
  assert output == str(tmp_path / "flat_segmented.png") and result["labels"] is None
  with Image.open(output) as picture:
    assert picture.width > 2 * 36


def test_segment_image_returns_pixel_logits_labels_and_groups(tmp_path):
  model = inference.load(make_checkpoint(tmp_path / "ckpt"))
  image = np.random.default_rng(1).integers(0, 255, (30, 50, 3), np.uint8)
  protocol = zeroshot.Protocol(short_side=40, window=32, stride=16, with_background=True, bg_threshold=0.5)
  result = segment.segment_image(model, image, ["circle", "square"], protocol)
  assert result["logits"].shape == (3, 30, 50) and result["labels"].shape == (30, 50)
  assert result["groups"].shape == (30, 50) and result["class_names"] == ("background", "circle", "square")
  np.testing.assert_array_equal(result["labels"], result["logits"].argmax(0))
  groups_only = segment.segment_image(model, image, None, protocol)
  assert groups_only["logits"] is None
  np.testing.assert_array_equal(groups_only["groups"], result["groups"])  # groups do not depend on the classes.


def test_segment_cli_takes_an_eval_configs_protocol_and_class_names(tmp_path):
  """--config=configs/eval/*.py: the evaluation's class names (without --classes) and protocol, with overrides."""
  checkpoint = make_checkpoint(tmp_path / "ckpt")
  Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 44, 3), np.uint8)).save(tmp_path / "in.png")
  synthetic.write_voc_split(str(tmp_path / "voc"), 2, 32, seed=0, split="voc")
  command = [sys.executable, "-m", "mixreorg_jax.segment", f"--checkpoint={checkpoint}",
             f"--image={tmp_path / 'in.png'}", "--config=configs/eval/synthetic.py"]

  def run(*extra):
    return subprocess.run(command + list(extra), cwd=REPO, capture_output=True, text=True, timeout=300)

  result = run(f"--output={tmp_path / 'out.png'}", f"--config.data.root={tmp_path / 'voc'}",
               "--config.bg_threshold=0.0")
  assert result.returncode == 0, result.stderr[-3000:]
  found = result.stdout.split("classes found: ")[1].split("\n")[0].split(", ")
  # The set's class_names.txt names the classes; at threshold 0 no pixel is background.
  assert found and set(found) <= set(synthetic.CLASS_NAMES) - {"background"}, result.stdout
  assert (tmp_path / "out.png").exists()
  no_names = run(f"--output={tmp_path / 'no_names.png'}")
  assert no_names.returncode != 0 and "--config.data.root" in no_names.stderr
  wrong = run(f"--output={tmp_path / 'wrong.png'}", "--config.bg_treshold=0.5", "--classes=circle")
  assert wrong.returncode != 0 and "bg_treshold" in wrong.stderr
  assert not (tmp_path / "no_names.png").exists() and not (tmp_path / "wrong.png").exists()
