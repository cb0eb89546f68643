#!/usr/bin/env bash
# TPU pod slice: the same command on every worker (vqjax installed on each).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/vqgan_imagenet.py gs://bucket/run1 [overrides...]
# On each worker `python -m vqjax.main` exits with status 75 (EX_TEMPFAIL) when a
# SIGTERM/SIGINT (e.g. a maintenance event) stopped training after saving a checkpoint: run
# this script again and it resumes from that checkpoint.
set -euo pipefail
tpu=${1:?TPU_NAME}; zone=${2:?ZONE}; config=${3:?CONFIG}; workdir=${4:?WORKDIR}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="\
python -m vqjax.main --distributed --config=$config --workdir=$workdir $*"
