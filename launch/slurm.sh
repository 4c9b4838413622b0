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
# save it and exit, and `sbatch --requeue` / re-submitting resumes from it. A process that loses a peer exits with
# status 75 (--kill-on-bad-exit then ends the rest); srun returns the failing status, and re-submitting resumes.
#SBATCH --job-name=mixreorg
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
PYTHON=${PYTHON:-python}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

if [[ "${PER_HOST:-0}" == 1 ]]; then
  TASKS=(--ntasks-per-node=1 --gpus-per-task="${SLURM_GPUS_PER_NODE:-8}")
else
  TASKS=(--ntasks-per-node="${SLURM_NTASKS_PER_NODE:-8}" --gpus-per-task=1)
fi
export TF_CPP_MIN_LOG_LEVEL=2
srun "${TASKS[@]}" --kill-on-bad-exit=1 \
  "$PYTHON" -m mixreorg_jax.train --config="$CONFIG" --workdir="$WORKDIR" --multihost "$@"
