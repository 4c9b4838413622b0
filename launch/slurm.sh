#!/usr/bin/env bash
# SLURM batch script for multi-GPU / multi-node training: one process per GPU (or per host), same command on all.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh configs/mixreorg_gcc_yfcc.py /shared/workdirs/run1 \
#       [--config.key=value ...]
#   PER_HOST=1 sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh ...   # one process per host, 8 GPUs each
#
# srun starts SLURM_NTASKS processes; the trainer gets --multihost, and jax.distributed.initialize() reads the
# coordinator address, process count and index from the SLURM environment (its cluster auto-detection), binding
# each process to its local GPU(s). The workdir must be on a filesystem every node sees. SLURM sends SIGTERM
# before the time limit or on preemption (--signal below asks for it 120 s ahead); the processes agree on a step,
# save it and exit 0, and `sbatch --requeue` / re-submitting resumes from it. A process that loses a peer (dead or
# hung) stops within ~30 s with one message and status 75. srun runs with --kill-on-bad-exit=0, so the first
# process to fail does not take the others down before they print theirs; --wait=GRACE (default 60 s) then ends
# any left. The script exits with the status of the first process (in process order) that failed with something
# other than 75, else 75 if any lost a peer (a dead host leaves no status; re-submit or requeue to resume), else 0;
# each process's status is in WORKDIR/exit_status/<process>.
#SBATCH --job-name=mixreorg
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,18p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
PYTHON=${PYTHON:-python}
GRACE=${GRACE:-60}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

if [[ "${PER_HOST:-0}" == 1 ]]; then
  TASKS=(--ntasks-per-node=1 --gpus-per-task="${SLURM_GPUS_PER_NODE:-8}")
else
  TASKS=(--ntasks-per-node="${SLURM_NTASKS_PER_NODE:-8}" --gpus-per-task=1)
fi
STATUS_DIR=$WORKDIR/exit_status
mkdir -p "$STATUS_DIR"
rm -f "$STATUS_DIR"/*
export TF_CPP_MIN_LOG_LEVEL=2 STATUS_DIR
code=0
# Each task records its trainer's status (bash -c: "$@" is the trainer's command line).
srun "${TASKS[@]}" --kill-on-bad-exit=0 --wait="$GRACE" bash -c \
  'code=0; "$@" || code=$?; echo "$code" > "$STATUS_DIR/$SLURM_PROCID"; exit "$code"' task \
  "$PYTHON" -m mixreorg_jax.train --config="$CONFIG" --workdir="$WORKDIR" --multihost "$@" || code=$?

status=0
written=0
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do
  if [[ -f "$STATUS_DIR/$i" ]]; then task=$(< "$STATUS_DIR/$i"); written=$((written + 1)); else task=lost; fi
  [[ "$task" == 0 ]] && continue
  echo "process $i: exit status $task" >&2
  if [[ "$task" != 75 && "$task" != lost && ( "$status" == 0 || "$status" == 75 ) ]]; then
    status=$task  # the first real failure: not a peer's loss, so not for requeueing blindly.
  elif [[ "$status" == 0 ]]; then
    status=75
  fi
done
if [[ "$written" -eq 0 ]]; then status=$code; fi  # srun started no trainer: its own status.
exit "$status"
