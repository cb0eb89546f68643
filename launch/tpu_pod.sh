#!/usr/bin/env bash
# TPU pod slice: the same command on every worker (vqjax installed on each).
#   launch/tpu_pod.sh [options] TPU_NAME ZONE configs/vqgan_imagenet.py gs://bucket/run1 [overrides...]
# Every worker runs `python -m vqjax.main --distributed --config=... --workdir=... ...` through
# `gcloud compute tpus tpu-vm ssh --worker=all`; JAX's TPU detection then gives worker i
# process id i of (number of workers) and puts the coordinator on worker 0 (port 8482).
# Before that the script prints the plan (below), read from
# `gcloud compute tpus tpu-vm describe` (accelerator type, worker addresses); a worker count
# that does not fit the type stops it.
#
# Options (before TPU_NAME):
#   --dry-run                 (or DRY_RUN=1) print the plan and exit 0; runs no gcloud.
#   --accelerator-type=TYPE   (or VQJAX_TPU_TYPE) e.g. v4-32; needed for --dry-run.
#   --workers=ADDR,ADDR,...   (or VQJAX_TPU_WORKERS) worker 0, 1, ... addresses; in a dry run
#                             without them the hosts are shown as worker0, worker1, ...
# Types: v2-N, v3-N (N TensorCores = JAX devices, 8 per host), v4-N, v5p-N (N TensorCores,
# N/2 chips = JAX devices, 4 per host; v4-32 = 4 hosts x 4 devices) and v5litepod-N (N chips;
# 1, 4 or 8 on one host, larger slices split by their worker list into VMs of 4 or 8).
# Plan lines, one per process (worker), in process-id order:
#   process I/N host=ADDR coordinator=ADDR0:8482 devices=0,1,2,3 via=jax-tpu-autodetect command: CMD
# An unknown type or a worker list that does not fit: one `error: ` line on stderr, exit 2.
# PYTHON is the local interpreter for the planner (default python3; it needs only this
# checkout), VQJAX_REMOTE_PYTHON the workers' (default python).
#
# On each worker `python -m vqjax.main` exits with status 75 (EX_TEMPFAIL) when a
# SIGTERM/SIGINT (e.g. a maintenance event) stopped training after saving a checkpoint: run
# this script again and it resumes from that checkpoint.
set -euo pipefail
usage="usage: launch/tpu_pod.sh [--dry-run] [--accelerator-type=TYPE] [--workers=ADDR,...] TPU_NAME ZONE CONFIG WORKDIR [overrides...]"
dry_run=${DRY_RUN:-0}
tpu_type=${VQJAX_TPU_TYPE:-}
workers=${VQJAX_TPU_WORKERS:-}
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --accelerator-type=*) tpu_type=${1#*=}; shift ;;
    --workers=*) workers=${1#*=}; shift ;;
    --accelerator-type|--workers)
      if [[ $# -lt 2 ]]; then echo "error: $1 needs a value; $usage" >&2; exit 2; fi
      if [[ $1 == --workers ]]; then workers=$2; else tpu_type=$2; fi
      shift 2 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1; $usage" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 4 ]]; then
  echo "error: $usage" >&2
  exit 2
fi
tpu=$1; zone=$2; config=$3; workdir=$4
shift 4
main_args=(--config="$config" --workdir="$workdir" "$@")
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
planner() {
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m vqjax.launch_plan tpu \
    --accelerator-type="$tpu_type" --workers="$workers" \
    --python="${VQJAX_REMOTE_PYTHON:-python}" "$@" -- "${main_args[@]}"
}

if [[ $dry_run == 1 ]]; then
  if [[ -z $tpu_type ]]; then
    echo "error: a dry run needs the accelerator type: --accelerator-type=v4-32 or VQJAX_TPU_TYPE" >&2
    exit 2
  fi
  planner
  exit 0
fi

describe() {
  gcloud compute tpus tpu-vm describe "$tpu" --zone="$zone" --format="value($1)" || {
    echo "error: 'gcloud compute tpus tpu-vm describe $tpu --zone=$zone' failed (see above)" >&2
    exit 2
  }
}
if [[ -z $tpu_type ]]; then
  tpu_type=$(describe acceleratorType)
  if [[ -z $tpu_type ]]; then
    echo "error: $tpu in $zone reports no accelerator type: pass --accelerator-type=TYPE" >&2
    exit 2
  fi
fi
if [[ -z $workers ]]; then
  workers=$(describe 'networkEndpoints[].ipAddress')
fi
planner
remote=$(planner --remote-command)
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$remote"
