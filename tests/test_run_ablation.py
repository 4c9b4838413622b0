"""The ablation table: mean ± std over seeds per variant, and the two baselines over all runs."""
from mixreorg_jax.tools import run_ablation


def test_table_reports_mean_std_per_variant_and_baselines():
  results = {
      "groupvit": [{"eval/mIoU": 10.0, "eval/chance_mIoU": 8.0, "eval/untrained_mIoU": 5.0, "eval/image_top1": 70.0,
                    "eval/image_top1_chance": 20.0, "eval/groups_per_image": 3.0},
                   {"eval/mIoU": 14.0, "eval/chance_mIoU": 10.0, "eval/image_top1": 80.0,
                    "eval/groups_per_image": 5.0}],
      "mixreorg": [{"eval/mIoU": 20.0, "eval/chance_mIoU": 9.0, "eval/untrained_mIoU": 7.0},
                   {"eval/mIoU": 30.0, "eval/chance_mIoU": 9.0, "eval/untrained_mIoU": 6.0}],
  }
  rows = run_ablation.table(results).strip().split("\n")
  assert rows[2] == ("| GroupViT baseline (`model.mixreorg=False`) | 12.0 ± 2.0 | 10.0, 14.0 | 75.0 ± 5.0 | "
                     "4.0 ± 1.0 |")
  assert rows[3] == "| MixReorg | 25.0 ± 5.0 | 20.0, 30.0 | n/a | n/a |"
  assert rows[4] == "| chance (random group assignment / random class) | 9.0 ± 0.7 | over 4 runs | 20.0 ± 0.0 | |"
  assert rows[5] == "| untrained model (the runs' initial parameters) | 6.0 ± 0.8 | over 3 runs |  | |"
  assert len(rows) == 6
