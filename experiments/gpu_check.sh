#!/usr/bin/env bash
# The GPU check of issue 40 (under 8 minutes on one H100): train and decode tokens/s and
# MFU, attention xla against cudnn, SmolLM2-135M and Llama-3.2-1B shapes in bfloat16.
# Needs the GPU requirements (pip install -r requirements-gpu.txt). Extra arguments go
# to experiments/gpu_check.py (e.g. --dry_run on a CPU machine, --peak_tflops=...).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; print(jax.devices())"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python experiments/gpu_check.py "$@"
