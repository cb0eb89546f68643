#!/usr/bin/env bash
# Multi-node GPU under SLURM, one process per node driving all its GPUs:
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/vqgan_imagenet.py /ckpt/run1
# Each srun task runs `python -m vqjax.main --distributed --coordinator=HOST0:PORT
# --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID --config=... --workdir=... ...`
# (computed in the task by `python -m vqjax.launch_plan slurm --task`, which prints its plan
# line first): HOST0 is the first node of the step's node list and PORT is 61440 + job id
# mod 4096, as JAX's own SLURM detection picks them; VQJAX_COORDINATOR_PORT overrides the port.
# The task's GPUs are the ones SLURM gives it (CUDA_VISIBLE_DEVICES).
#
# Dry run: `--dry-run` as the first argument (or DRY_RUN=1) prints, for every process of the
# allocation, one line and runs nothing:
#   process I/N host=HOST coordinator=HOST0:PORT devices=D via=flags command: CMD
# (I = process id, N = process count, D = local GPU indices, CMD = the exact command). It
# reads the batch script's variables (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NTASKS, and
# SLURM_NNODES, SLURM_TASKS_PER_NODE, SLURM_GPUS_ON_NODE or SLURM_JOB_GPUS when set), so it
# works in an salloc shell or with those variables set by hand. A missing variable or a node
# list that does not parse: one `error: ` line on stderr, exit status 2.
# PYTHON names the interpreter (default: python).
#
# A SIGTERM (preemption, or the one asked for 2 minutes before the time limit) makes the run
# save a checkpoint and exit with status 75 (EX_TEMPFAIL); the job then requeues itself and
# the next start resumes from that checkpoint.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@120
set -euo pipefail
usage="usage: sbatch launch/slurm_gpu.sh [--dry-run] CONFIG WORKDIR [overrides...]"
dry_run=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 2 || -z $1 || -z $2 ]]; then
  echo "error: $usage" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
python=${PYTHON:-python}
main_args=(--config="$config" --workdir="$workdir" "$@")

if [[ $dry_run == 1 ]]; then
  # Run from a checkout, the planner comes from it (under sbatch the script is a copy).
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ -f $repo/vqjax/launch_plan.py ]]; then
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  fi
  exec "$python" -m vqjax.launch_plan slurm --python="$python" -- "${main_args[@]}"
fi

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "error: SLURM_JOB_ID is not set (not inside a SLURM allocation): submit with" \
    "sbatch launch/slurm_gpu.sh CONFIG WORKDIR, or pass --dry-run first to see the plan" >&2
  exit 2
fi
status=0
srun "$python" -m vqjax.launch_plan slurm --task --python="$python" -- "${main_args[@]}" \
  || status=$?
if [[ $status -eq 75 ]]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
