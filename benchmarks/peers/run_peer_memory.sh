#!/usr/bin/env bash
# Peak resident memory of the peers' AWQ and GPTQ on the memory benchmark's synthetic 32-layer Llama (3.15 GB of
# BF16 weights), quantize only, model loaded in BF16 as users load it (no evaluation, no base model).
# lowbit's side: python benchmarks/memory/run.py --qformat int4_awq --algorithm gptq|awq_full (same model, same
# calibration: 32 x 256 tokens of the built-in calib.txt). Usage: bash benchmarks/peers/run_peer_memory.sh
# Env: MODEL (default .bench/memory/llama-32L, built by benchmarks/memory/run.py), CALIB, OUT, THREADS, TIME_LIMIT
# (seconds per run, then stopped: the peak it reached is a lower bound; on a CPU the peers' GPTQ takes hours).
# Each run is measured by benchmarks/memory/peak.py (ru_maxrss of the child, os.wait4): one JSON line in OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS_DIR="${LOWBIT_PEERS_DIR:-$HOME/.cache/lowbit-peers}"
MODEL="${MODEL:-.bench/memory/llama-32L}"
CALIB="${CALIB:-src/lowbit/assets/text/calib.txt}"
OUT="${OUT:-benchmarks/results/peers-memory-32L.jsonl}"
THREADS="${THREADS:-1}"
TIME_LIMIT="${TIME_LIMIT:-}"
MODELOPT_RUNS="${MODELOPT_RUNS:-int4_awq:gptq,int4_awq:awq_lite}"
LLMC_RUNS="${LLMC_RUNS:-int4_awq:gptq,int4_awq:awq_nopin}"
[[ -f "$MODEL/config.json" ]] || { echo "no model at $MODEL: run python benchmarks/memory/run.py first" >&2; exit 1; }
bash benchmarks/peers/setup.sh
mkdir -p benchmarks/results/logs
rm -f "$OUT"
common=(--model "$MODEL" --calib "$CALIB" --calib-size 32 --calib-seq-len 256 --no-eval --dtype bfloat16
        --threads "$THREADS" --out "$OUT.rows")
limit=()
[[ -n "$TIME_LIMIT" ]] && limit=(--time-limit "$TIME_LIMIT")
run() {  # tool python script preset:algorithm -- the peak RSS of one run in its own process
  local tool="$1" python="$2" script="$3" run="$4"
  "${PYTHON:-python}" benchmarks/memory/peak.py --out "$OUT" --label "$tool-${run/:/-}" "${limit[@]}" \
      --log "benchmarks/results/logs/$tool-memory-${run/:/-}.log" -- "$python" "$script" --runs "$run" "${common[@]}"
}
IFS=, read -ra mo <<< "$MODELOPT_RUNS"
IFS=, read -ra lc <<< "$LLMC_RUNS"
[[ "$MODELOPT_RUNS" == none ]] || for r in "${mo[@]}"; do
  run modelopt "$PEERS_DIR/modelopt/bin/python" benchmarks/peers/modelopt_ptq.py "$r"; done
[[ "$LLMC_RUNS" == none ]] || for r in "${lc[@]}"; do
  run llmcompressor "$PEERS_DIR/llmcompressor/bin/python" benchmarks/peers/llmcompressor_ptq.py "$r"; done
