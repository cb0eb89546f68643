#!/usr/bin/env bash
# Multi-node GPU under SLURM, one process per node driving all its GPUs:
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/vqgan_imagenet.py /ckpt/run1
# jax.distributed.initialize() reads the coordinator and process ids from SLURM.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=${1:?usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: sbatch launch/slurm_gpu.sh CONFIG WORKDIR [overrides...]}
shift 2
srun python -m vqjax.main --distributed --config="$config" --workdir="$workdir" "$@"
