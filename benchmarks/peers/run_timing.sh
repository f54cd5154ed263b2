#!/usr/bin/env bash
# Quantize-only wall time of lowbit and ModelOpt, one job at a time, REPS rounds that alternate the tools (so
# that a change of machine load hits both), same model, calibration and thread count as the algorithm runs.
# No evaluation: the KL of the same runs is in the algorithm tables. Writes one JSONL row per run:
#   bash benchmarks/peers/run_timing.sh            # -> benchmarks/results/timing-pydocs.jsonl
#   REPS=5 RUNS=int8_sq:smoothquant bash benchmarks/peers/run_timing.sh
# Env: LOWBIT_PEERS_DIR (venvs), MODEL, CALIB, OUT, REPS (3), RUNS (PRESET:ALGORITHM list, both tools),
# THREADS (1). benchmarks/side_by_side.py OUT compares the medians.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PEERS_DIR="${LOWBIT_PEERS_DIR:-$HOME/.cache/lowbit-peers}"
MODEL="${MODEL:-/work/shared/models/pydocs-llama}"
CALIB="${CALIB:-/work/shared/data/pydocs/calib.txt}"
OUT="${OUT:-$REPO/benchmarks/results/timing-pydocs.jsonl}"
REPS="${REPS:-3}"
RUNS="${RUNS:-int8_sq:smoothquant,fp8:max,w4a8_awq:max}"
THREADS="${THREADS:-1}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

bash "$HERE/setup.sh" modelopt
: > "$OUT"
for rep in $(seq "$REPS"); do
  echo "[run_timing] round $rep of $REPS"
  "$PEERS_DIR/modelopt/bin/python" "$HERE/modelopt_ptq.py" --model "$MODEL" --calib "$CALIB" --calib-size 512 \
    --calib-seq-len 512 --no-eval --isolate --threads "$THREADS" --runs "$RUNS" --out "$OUT"
  python "$REPO/benchmarks/ptq_presets.py" --model "$MODEL" --calib "$CALIB" --calib-size 512 --calib-seq-len 512 \
    --no-eval --isolate --threads "$THREADS" --presets "$RUNS" --out "$OUT.lowbit"
  cat "$OUT.lowbit" >> "$OUT" && rm "$OUT.lowbit"
done
echo "[run_timing] wrote $OUT"
