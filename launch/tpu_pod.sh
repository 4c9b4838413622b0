#!/usr/bin/env bash
# Runs the trainer on every worker of a Cloud TPU VM pod slice (one process per host; JAX finds the others).
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh configs/mixreorg_gcc_yfcc.py gs://bucket/workdirs/run1 \
#       [--config.key=value ...]
#
# `gcloud compute tpus tpu-vm ssh --worker=all` runs the same command on all hosts. The trainer gets --multihost,
# so jax.distributed.initialize() auto-detects the pod (coordinator, process count and index come from the TPU
# metadata). The workdir must be shared by all hosts (a gs:// bucket): orbax writes one checkpoint collectively,
# and each host saves its own tf.data position next to it. REPO_DIR (default ~/mixreorg_jax) is the checkout on
# the workers; SETUP (optional) runs before training, e.g. SETUP="git -C ~/mixreorg_jax pull". A preempted or
# maintenance-evicted pod gets SIGTERM: the hosts agree on a step, save it and exit; re-running this script
# resumes from it. A worker that loses a peer stops within ~15 s with one message and status 75; the ssh command
# returns a failing worker's status, and re-running this script resumes from the latest complete checkpoint.
set -euo pipefail

if [[ $# -lt 2 || -z "${TPU_NAME:-}" || -z "${ZONE:-}" ]]; then
  sed -n '2,14p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
REPO_DIR=${REPO_DIR:-'~/mixreorg_jax'}  # expanded on the workers.
PYTHON=${PYTHON:-python3}
EXTRA=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="set -e; ${SETUP:-true}; cd ${REPO_DIR} && \
    ${PYTHON} -m mixreorg_jax.train --config=${CONFIG} --workdir=${WORKDIR} --multihost${EXTRA}"
