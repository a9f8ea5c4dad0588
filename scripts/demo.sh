#!/usr/bin/env bash
# The main job: install (into .venv) and run the TP=2 LoRA demo on CPU with two gloo ranks.
#   bash scripts/demo.sh [demo flags, e.g. --lora-steps 200]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
torchrun --nproc-per-node "${NPROC:-2}" scripts/demo_lora_tp2.py "$@"
