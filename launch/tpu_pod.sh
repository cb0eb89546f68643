#!/usr/bin/env bash
# TPU pod slice: the same command on every worker (vqjax installed on each).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/vqgan_imagenet.py gs://bucket/run1 [overrides...]
set -euo pipefail
tpu=${1:?TPU_NAME}; zone=${2:?ZONE}; config=${3:?CONFIG}; workdir=${4:?WORKDIR}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="\
python -m vqjax.main --distributed --config=$config --workdir=$workdir $*"
