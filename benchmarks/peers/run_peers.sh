#!/usr/bin/env bash
# Set up the peer venvs (setup.sh) and run both peers on pydocs-llama with lowbit's protocol:
# 512 calibration windows x 512 tokens (seed 0, batches of 16), all eval windows of 512 tokens, float32,
# one format per process (--isolate), 1 torch thread each. Writes benchmarks/results/peers-pydocs-max.jsonl.
#   bash benchmarks/peers/run_peers.sh              # the two tools one after the other
#   PARALLEL=1 bash benchmarks/peers/run_peers.sh   # both tools at once (2 cores; ~half the wall time)
# Env: LOWBIT_PEERS_DIR (venvs), MODEL, CALIB, EVAL, OUT, THREADS, MODELOPT_FORMATS, LLMC_FORMATS.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PEERS_DIR="${LOWBIT_PEERS_DIR:-$HOME/.cache/lowbit-peers}"
MODEL="${MODEL:-/work/shared/models/pydocs-llama}"
CALIB="${CALIB:-/work/shared/data/pydocs/calib.txt}"
EVAL="${EVAL:-/work/shared/data/pydocs/eval.txt}"
OUT="${OUT:-$REPO/benchmarks/results/peers-pydocs-max.jsonl}"
THREADS="${THREADS:-1}"
MODELOPT_FORMATS="${MODELOPT_FORMATS:-fp8,fp8_pc_pt,fp8_pb_wo,int8_sq,int8_wo,int4_awq,w4a8_awq,nvfp4,nvfp4_wo,mxfp8,mxfp4}"
LLMC_FORMATS="${LLMC_FORMATS:-fp8,fp8_pc_pt,fp8_pb_wo,int8_sq,int8_wo,int8_wo_channel,int4_awq,nvfp4,nvfp4_wo,mxfp8,mxfp4}"

bash "$HERE/setup.sh"

mkdir -p "$(dirname "$OUT")" "$REPO/benchmarks/results/logs"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
COMMON=(--model "$MODEL" --calib "$CALIB" --eval "$EVAL" --calib-size 512 --calib-seq-len 512 --seq-len 512
        --isolate --threads "$THREADS")
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run_modelopt() {
  "$PEERS_DIR/modelopt/bin/python" "$HERE/modelopt_ptq.py" "${COMMON[@]}" --formats "$MODELOPT_FORMATS" \
    --out "$TMP/modelopt.jsonl" > "$REPO/benchmarks/results/logs/modelopt.log" 2>&1
}
run_llmc() {
  "$PEERS_DIR/llmcompressor/bin/python" "$HERE/llmcompressor_ptq.py" "${COMMON[@]}" --formats "$LLMC_FORMATS" \
    --out "$TMP/llmcompressor.jsonl" > "$REPO/benchmarks/results/logs/llmcompressor.log" 2>&1
}

t0=$SECONDS
rc=0
if [[ "${PARALLEL:-0}" == 1 ]]; then
  run_modelopt & p1=$!
  run_llmc & p2=$!
  wait $p1 || rc=$?
  wait $p2 || rc=$?
else
  run_modelopt || rc=$?
  run_llmc || rc=$?
fi
cat "$TMP/modelopt.jsonl" "$TMP/llmcompressor.jsonl" > "$OUT" 2>/dev/null || true
echo "[run_peers] wrote $(wc -l < "$OUT") rows to $OUT in $((SECONDS - t0)) s (logs: benchmarks/results/logs/)"
exit $rc
