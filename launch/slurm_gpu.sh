#!/usr/bin/env bash
# Multi-node GPU under SLURM, one process per node driving all its GPUs:
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/vqgan_imagenet.py /ckpt/run1
# jax.distributed.initialize() reads the coordinator and process ids from SLURM.
# A SIGTERM (preemption, or the one asked for 2 minutes before the time limit) makes the run
# save a checkpoint and exit with status 75 (EX_TEMPFAIL); the job then requeues itself and
# the next start resumes from that checkpoint.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@120
set -euo pipefail
config=${1:?usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [overrides...]}
shift 2
status=0
srun python -m vqjax.main --distributed --config="$config" --workdir="$workdir" "$@" || status=$?
if [[ $status -eq 75 ]]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
