#!/usr/bin/env bash
# Run the peers' own calibration algorithms (SmoothQuant, AWQ, GPTQ; see README.md) with lowbit's protocol:
# 512 calibration windows x 512 tokens (seed 0, batches of 16), all eval windows of 512 tokens, float32,
# one run per process (--isolate), 1 torch thread, ModelOpt first and then llm-compressor, never in parallel.
# Writes benchmarks/results/peers-pydocs-algorithms.jsonl (logs: benchmarks/results/logs/*-algorithms.log).
#   bash benchmarks/peers/run_peer_algorithms.sh
#   MODEL=/path/to/model CALIB=calib.txt EVAL=eval.txt OUT=benchmarks/results/peers-other-algorithms.jsonl \
#     bash benchmarks/peers/run_peer_algorithms.sh
#   MODELOPT_RUNS=int4_awq:awq_lite LLMC_RUNS=none APPEND=1 bash benchmarks/peers/run_peer_algorithms.sh
# Env: LOWBIT_PEERS_DIR (venvs), MODEL, CALIB, EVAL, OUT, THREADS, LOG_TAG (log file suffix, default "algorithms"),
# MODELOPT_RUNS / LLMC_RUNS (PRESET:ALGORITHM lists; default: each script's --algorithm-runs list; "none" skips
# the tool), APPEND=1 (append to OUT and the logs instead of replacing them), CALIB_SIZE / CALIB_SEQ_LEN /
# EVAL_SAMPLES (defaults 512 / 512 / all: the protocol; smaller only for a smoke test).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PEERS_DIR="${LOWBIT_PEERS_DIR:-$HOME/.cache/lowbit-peers}"
MODEL="${MODEL:-/work/shared/models/pydocs-llama}"
CALIB="${CALIB:-/work/shared/data/pydocs/calib.txt}"
EVAL="${EVAL:-/work/shared/data/pydocs/eval.txt}"
OUT="${OUT:-$REPO/benchmarks/results/peers-pydocs-algorithms.jsonl}"
THREADS="${THREADS:-1}"
LOG_TAG="${LOG_TAG:-algorithms}"
MODELOPT_RUNS="${MODELOPT_RUNS:-}"
LLMC_RUNS="${LLMC_RUNS:-}"
LOGS="$REPO/benchmarks/results/logs"

bash "$HERE/setup.sh"

mkdir -p "$(dirname "$OUT")" "$LOGS"
if [[ "${APPEND:-0}" != 1 ]]; then
  : > "$OUT"
  : > "$LOGS/modelopt-$LOG_TAG.log"
  : > "$LOGS/llmcompressor-$LOG_TAG.log"
fi
COMMON=(--model "$MODEL" --calib "$CALIB" --eval "$EVAL" --calib-size "${CALIB_SIZE:-512}"
        --calib-seq-len "${CALIB_SEQ_LEN:-512}" --seq-len 512 --isolate --threads "$THREADS" --out "$OUT")
[[ -z "${EVAL_SAMPLES:-}" ]] || COMMON+=(--eval-samples "$EVAL_SAMPLES")
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# run TOOL SCRIPT RUNS: RUNS empty = the script's --algorithm-runs, "none" = skip
run() {
  local tool="$1" script="$2" runs="$3" sel
  [[ "$runs" == none ]] && return 0
  if [[ -n "$runs" ]]; then sel=(--runs "$runs"); else sel=(--algorithm-runs); fi
  echo "[run_peer_algorithms] $tool ${sel[*]} -> $OUT (log: $LOGS/$tool-$LOG_TAG.log)"
  "$PEERS_DIR/$tool/bin/python" "$HERE/$script" "${COMMON[@]}" "${sel[@]}" >> "$LOGS/$tool-$LOG_TAG.log" 2>&1
}

t0=$SECONDS
rc=0
run modelopt modelopt_ptq.py "$MODELOPT_RUNS" || rc=$?
run llmcompressor llmcompressor_ptq.py "$LLMC_RUNS" || rc=$?
echo "[run_peer_algorithms] $(wc -l < "$OUT") rows in $OUT after $((SECONDS - t0)) s (logs: $LOGS/*-$LOG_TAG.log)"
exit $rc
