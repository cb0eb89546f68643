#!/usr/bin/env bash
# Single host (CPU or one GPU node): launch/local.sh configs/demo.py runs/demo [--config.x=y ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
exec python -m vqjax.main --config="$config" --workdir="$workdir" "$@"
