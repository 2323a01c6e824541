#!/usr/bin/env bash
# Submit mmar-jax train, or another job after `--`, as a SLURM job (launch/slurm.sbatch); --help.
# The logic (argument checks, the commands) lives in mmar_jax/launch/gpu.py; --dry-run prints them.
# Runs with the Python on PATH (activate the project's venv) or $PYTHON.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m mmar_jax.launch.gpu slurm "$@"
