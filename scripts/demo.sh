#!/usr/bin/env bash
# The main job: a tiny GPT pretrained on Python code, then LoRA-fine-tuned at TP=2 on prose, on CPU.
#
#   bash scripts/demo.sh                 # about 2-3 minutes on 2 CPU cores, installs into .venv/
#   bash scripts/demo.sh --lora-rank 16  # extra flags go to the LoRA run
#   bash scripts/demo.sh --num-experts 4 # mixture of experts (top-2): about a minute, see below
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
# With --num-experts N (and optionally --moe-router-topk K, --moe-shared-expert-intermediate-size S,
# which go to both runs) every MLP is a mixture of N experts of FFN size 128; step 4 then runs at
# expert parallelism 2 (N/2 experts per rank, all-to-all dispatcher) instead of TP=2, with LoRA on
# attention and every expert, and fewer iterations by default (BASE_ITERS 60, LORA_ITERS 40, MAX_FILES 30).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${DEMO_PYTHON_READY:-}" ]; then source scripts/env.sh; fi
OUT="${DEMO_DIR:-runs/demo}"
rm -rf "${OUT}" && mkdir -p "${OUT}"

# The architecture flags of a mixture of experts go to both runs; every other flag to the LoRA run.
MOE=() EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --num-experts|--moe-router-topk|--moe-shared-expert-intermediate-size) MOE+=("$1" "$2"); shift 2 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
if [ ${#MOE[@]} -gt 0 ]; then
    MOE+=(--ffn-hidden-size 128)
    LAYOUT=(--expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall) LAYOUT_NAME="EP=2"
    : "${BASE_ITERS:=60}" "${LORA_ITERS:=40}" "${MAX_FILES:=30}"
    # The experts' GEMMs are tiny (128 wide): one thread runs them as fast, and 7x faster where
    # other processes share the cores (measured on a loaded 2-core machine).
    BASE_ENV=(env "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
else
    LAYOUT=(--tensor-model-parallel-size 2) LAYOUT_NAME="TP=2" BASE_ENV=()
fi

python scripts/demo_corpus.py --output-dir "${OUT}/corpus" --max-files "${MAX_FILES:-120}"
python scripts/preprocess_data.py --input "${OUT}/corpus/code.jsonl" --output-prefix "${OUT}/data/code"
python scripts/preprocess_data.py --input "${OUT}/corpus/docstrings.jsonl" --output-prefix "${OUT}/data/docstrings"

MODEL=(--num-layers 2 --hidden-size 128 --num-attention-heads 8 --num-query-groups 4 --swiglu
       --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
       --hidden-dropout 0 --attention-dropout 0 --seq-length 64 --micro-batch-size 8
       --eval-iters 8 --log-interval 25 --seed 1234 ${MOE[@]+"${MOE[@]}"})

echo "=== 1/2: pretrain the base on code (TP=1)"
${BASE_ENV[@]+"${BASE_ENV[@]}"} python scripts/pretrain_gpt_lora.py --nproc-per-node 1 "${MODEL[@]}" \
    --data-path "${OUT}/data/code" --split 98,2,0 --train-iters "${BASE_ITERS:-150}" --lr 3e-3 \
    --lr-decay-style cosine --lr-warmup-iters 10 --eval-interval 100000 --save "${OUT}/base"

echo "=== 2/2: LoRA on docstrings (${LAYOUT_NAME}, base frozen)"
python scripts/pretrain_gpt_lora.py --nproc-per-node 2 "${LAYOUT[@]}" "${MODEL[@]}" \
    --data-path "${OUT}/data/docstrings" --split 98,2,0 --train-iters "${LORA_ITERS:-100}" --lr 3e-3 \
    --lr-decay-style constant --eval-interval 1000 --pretrained-checkpoint "${OUT}/base" \
    --lora-rank 8 --lora-alpha 16 --save "${OUT}/lora" ${EXTRA[@]+"${EXTRA[@]}"}

python - "${OUT}/lora/metrics.json" <<'PY'
import json, sys
valid = json.load(open(sys.argv[1]))["valid"]
ok = valid["final"] < valid["base"]
print(f"validation loss on docstrings: frozen base {valid['base']:.4f} -> LoRA {valid['final']:.4f}")
where = sys.argv[1].rsplit("/", 1)[0]
print(f"demo OK: adapter saved in {where}" if ok else "demo FAILED: LoRA did not beat the frozen base")
sys.exit(0 if ok else 1)
PY
