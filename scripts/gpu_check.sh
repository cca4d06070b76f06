#!/usr/bin/env bash
# One device call's GPU check of nlip-ds (at most 8 minutes on one H100/H200), or its CPU rehearsal:
#
#   scripts/gpu_check.sh [--out DIR] [--budget SECONDS]     # on the GPU machine; report into $OUT by default
#   scripts/gpu_check.sh --dry-run --out DIR                # anywhere: the same stages on the CPU, tiny sizes
#
# Installs the wheels of .whl/ (scripts/gpu_wheels.sh) into a scratch target on PYTHONPATH, builds the CUDA
# extension just in time for the GPU, runs the self-check and the CUDA kernel tests, times the fused loss against
# the naive one (N = 32768, d = 512, bf16; one process and one rank of eight), trains the tiny config and a
# ViT-B/32-sized model 30 steps (bf16, ZeRO-3, 1 GPU) through `nlip-ds train`, and writes report.md and
# report.json. Each stage has its own time limit; a failed stage is reported and the next one runs. The stages
# live in scripts/gpu_check.py (its docstring lists them); docs/performance.md, "GPU check", says how to call it.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
