"""launch/slurm.sh without SLURM: a fake srun on PATH runs the tasks, a fake trainer exits with a chosen status."""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs every task (SLURM_NTASKS of them) of the command after srun's options, and returns the highest status, as
# srun does; its arguments go to srun_args.txt.
FAKE_SRUN = """#!/usr/bin/env bash
echo "$@" > "$FAKE_DIR/srun_args.txt"
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
worst=0
for pid in "${pids[@]}"; do code=0; wait "$pid" || code=$?; (( code > worst )) && worst=$code; done
exit "$worst"
"""
# The trainer of task i exits with word i of FAKE_STATUSES; "gone" kills the task's shell too (a dead host).
FAKE_TRAINER = """#!/usr/bin/env bash
statuses=($FAKE_STATUSES)
status=${statuses[$SLURM_PROCID]}
if [[ "$status" == gone ]]; then kill -KILL "$PPID"; exit 1; fi
exit "$status"
"""


@pytest.mark.parametrize("statuses, want", [
    ("0 0", 0),
    ("75 75", 75),   # both lost the other (a hang seen by both)
    ("75 gone", 75),  # a dead host: no status; the survivor lost it. Requeue.
    ("75 137", 137),  # a process killed by a signal, the other lost it: the signal's status.
    ("75 1 75", 1),   # a real failure (a full disk, a NaN halt) is not hidden behind the lost peers.
    ("0 gone", 75),
])
def test_slurm_script_exits_with_the_first_real_failure_else_75_for_a_lost_peer(tmp_path, statuses, want):
  for name, text in (("srun", FAKE_SRUN), ("trainer", FAKE_TRAINER)):
    (tmp_path / name).write_text(text)
    (tmp_path / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), FAKE_STATUSES=statuses,
             PYTHON=str(tmp_path / "trainer"), SLURM_NTASKS=str(len(statuses.split())), SLURM_SUBMIT_DIR=REPO)
  result = subprocess.run(["bash", "launch/slurm.sh", "configs/demo.py", str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == want, result.stderr
  srun_args = (tmp_path / "srun_args.txt").read_text()
  assert "--kill-on-bad-exit=0 --wait=60 bash -c" in srun_args  # the survivors live to print their message.
  assert f"trainer -m mixreorg_jax.train --config=configs/demo.py --workdir={tmp_path / 'run'} --multihost" in srun_args
