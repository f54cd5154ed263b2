#!/usr/bin/env bash
# Peak resident memory of the peers' AWQ and GPTQ on the memory benchmark's synthetic 32-layer Llama (3.15 GB of
# BF16 weights), quantize only, model loaded in BF16 as users load it (no evaluation, no base model).
# lowbit's side: python benchmarks/memory/run.py --qformat int4_awq --algorithm gptq|awq_full (same model, same
# calibration: 32 x 256 tokens of the built-in calib.txt). Usage: bash benchmarks/peers/run_peer_memory.sh
# Env: MODEL (default .bench/memory/llama-32L, built by benchmarks/memory/run.py), CALIB, OUT, THREADS.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS_DIR="${LOWBIT_PEERS_DIR:-$HOME/.cache/lowbit-peers}"
MODEL="${MODEL:-.bench/memory/llama-32L}"
CALIB="${CALIB:-src/lowbit/assets/text/calib.txt}"
OUT="${OUT:-benchmarks/results/peers-memory-32L.jsonl}"
THREADS="${THREADS:-1}"
MODELOPT_RUNS="${MODELOPT_RUNS:-int4_awq:gptq,int4_awq:awq_lite}"
LLMC_RUNS="${LLMC_RUNS:-int4_awq:gptq,int4_awq:awq_nopin}"
[[ -f "$MODEL/config.json" ]] || { echo "no model at $MODEL: run python benchmarks/memory/run.py first" >&2; exit 1; }
bash benchmarks/peers/setup.sh
mkdir -p benchmarks/results/logs
rm -f "$OUT"
common=(--model "$MODEL" --calib "$CALIB" --calib-size 32 --calib-seq-len 256 --no-eval --dtype bfloat16
        --isolate --threads "$THREADS" --out "$OUT")
[[ "$MODELOPT_RUNS" == none ]] || "$PEERS_DIR/modelopt/bin/python" benchmarks/peers/modelopt_ptq.py \
    --runs "$MODELOPT_RUNS" "${common[@]}" 2>&1 | tee benchmarks/results/logs/modelopt-memory.log
[[ "$LLMC_RUNS" == none ]] || "$PEERS_DIR/llmcompressor/bin/python" benchmarks/peers/llmcompressor_ptq.py \
    --runs "$LLMC_RUNS" "${common[@]}" 2>&1 | tee benchmarks/results/logs/llmcompressor-memory.log
