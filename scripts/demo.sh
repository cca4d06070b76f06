#!/usr/bin/env bash
# The main command of the README's Quick start: installs what it needs, then runs the whole NLIP path on
# this machine: synthetic noisy image-text data -> DeepSpeed ZeRO-3 training on 2 CPU ranks (GPUs when
# present) with the noise estimator -> evaluation on the clean test split -> a summary and the TensorBoard
# command. Environment: DEMO_DATA (default demo_data), DEMO_RUN (default runs/tiny-cpu), DEMO_RANKS (2),
# DEMO_SAMPLES (4000); extra arguments are config overrides, e.g. `bash scripts/demo.sh train.epochs=2`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$NLIP_ROOT"
DATA="${DEMO_DATA:-demo_data}"
RUN="${DEMO_RUN:-runs/tiny-cpu}"
RANKS="${DEMO_RANKS:-2}"

if [ ! -f "$DATA/train/index.json" ]; then
  nlip-ds data synth --out "$DATA" --num-samples "${DEMO_SAMPLES:-4000}" --seed 0
fi
nlip-ds data inspect "$DATA/train"

if [ -d "$RUN" ]; then
  echo "[nlip-ds] removing the previous demo run $RUN" >&2
  rm -rf "$RUN"
fi
# Each CPU rank gets an equal share of the cores; deepspeed picks the CPU accelerator and gloo without GPUs.
export OMP_NUM_THREADS=$(( $(nproc) / RANKS > 0 ? $(nproc) / RANKS : 1 ))
deepspeed --num_gpus "$RANKS" --master_port "${MASTER_PORT:-29533}" --module nlip_ds.cli train \
  --config configs/tiny-cpu.yaml "data.train=$DATA/train" "data.val=$DATA/val" "data.test=$DATA/test" \
  "data.tokenizer=$DATA/tokenizer" "train.output_dir=$RUN" "$@"
# The run's evaluation beside the CLIP loss's at the same budget (recorded once, scripts/demo_compare.py).
python scripts/demo_compare.py "$RUN"
