#!/usr/bin/env bash
# The main job: a tiny GPT pretrained on Python code, then LoRA-fine-tuned at TP=2 on prose, on CPU.
#
#   bash scripts/demo.sh                 # about 2-3 minutes on 2 CPU cores, installs into .venv/
#   bash scripts/demo.sh --lora-rank 16  # extra flags go to the LoRA run
# Overrides: DEMO_DIR (default runs/demo), BASE_ITERS, LORA_ITERS, MAX_FILES, and
# DEMO_PYTHON_READY=1 to use the active Python instead of installing into .venv (the tests do).
#
# 1. corpus: read at run time from this machine's Python standard library (nothing downloaded,
#    no text in the repository): A = module source without docstrings, B = the docstrings.
# 2. preprocess both into Megatron indexed datasets (byte-level tokenizer).
# 3. pretrain the base on A (TP=1, one process), saved as a Megatron dist checkpoint.
# 4. LoRA on B at TP=2 (two gloo ranks): the base loads resharded to TP=2 and stays frozen; only
#    the adapter trains and is saved. It prints the validation loss on B of the frozen base and
#    of base + LoRA (LoRA must be lower) and checks the replicated LoRA factors across TP ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${DEMO_PYTHON_READY:-}" ]; then source scripts/env.sh; fi
OUT="${DEMO_DIR:-runs/demo}"
rm -rf "${OUT}" && mkdir -p "${OUT}"

python scripts/demo_corpus.py --output-dir "${OUT}/corpus" --max-files "${MAX_FILES:-120}"
python scripts/preprocess_data.py --input "${OUT}/corpus/code.jsonl" --output-prefix "${OUT}/data/code"
python scripts/preprocess_data.py --input "${OUT}/corpus/docstrings.jsonl" --output-prefix "${OUT}/data/docstrings"

MODEL=(--num-layers 2 --hidden-size 128 --num-attention-heads 8 --num-query-groups 4 --swiglu
       --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
       --hidden-dropout 0 --attention-dropout 0 --seq-length 64 --micro-batch-size 8
       --eval-iters 8 --log-interval 25 --seed 1234)

echo "=== 1/2: pretrain the base on code (TP=1)"
python scripts/pretrain_gpt_lora.py --nproc-per-node 1 "${MODEL[@]}" \
    --data-path "${OUT}/data/code" --split 98,2,0 --train-iters "${BASE_ITERS:-150}" --lr 3e-3 \
    --lr-decay-style cosine --lr-warmup-iters 10 --eval-interval 100000 --save "${OUT}/base"

echo "=== 2/2: LoRA on docstrings (TP=2, base frozen)"
python scripts/pretrain_gpt_lora.py --nproc-per-node 2 --tensor-model-parallel-size 2 "${MODEL[@]}" \
    --data-path "${OUT}/data/docstrings" --split 98,2,0 --train-iters "${LORA_ITERS:-100}" --lr 3e-3 \
    --lr-decay-style constant --eval-interval 1000 --pretrained-checkpoint "${OUT}/base" \
    --lora-rank 8 --lora-alpha 16 --save "${OUT}/lora" "$@"

python - "${OUT}/lora/metrics.json" <<'PY'
import json, sys
valid = json.load(open(sys.argv[1]))["valid"]
ok = valid["final"] < valid["base"]
print(f"validation loss on docstrings: frozen base {valid['base']:.4f} -> LoRA {valid['final']:.4f}")
where = sys.argv[1].rsplit("/", 1)[0]
print(f"demo OK: adapter saved in {where}" if ok else "demo FAILED: LoRA did not beat the frozen base")
sys.exit(0 if ok else 1)
PY
