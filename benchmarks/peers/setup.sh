#!/usr/bin/env bash
# Create the two peer-tool virtual environments OUTSIDE the project:
#   ${LOWBIT_PEERS_DIR:-$HOME/.cache/lowbit-peers}/modelopt       nvidia-modelopt==0.47.0 + transformers==5.14.1
#   ${LOWBIT_PEERS_DIR:-$HOME/.cache/lowbit-peers}/llmcompressor  llmcompressor==0.14.0.1 + transformers==5.17.0 + datasets
# torch==2.13.0 is installed first in each venv so that pip resolves the tools against the CPU build already
# present (installing torch implicitly may pull a multi-GB CUDA build). Idempotent: a venv whose pinned
# packages are already importable at the pinned versions is left alone. Usage: bash benchmarks/peers/setup.sh [modelopt|llmcompressor]...
set -euo pipefail

PEERS_DIR="${LOWBIT_PEERS_DIR:-$HOME/.cache/lowbit-peers}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${LOWBIT_PEERS_TORCH:-torch==2.13.0}"
mkdir -p "$PEERS_DIR"

# pip specs per venv, and an import check printing OK when the venv is complete
declare -A SPECS=(
  # requests: modelopt 0.47 imports it (modelopt/torch/utils/dataset_utils.py) but declares it only via its
  # heavy [hf] extra (deepspeed, diffusers, peft, ...), which this benchmark does not need.
  [modelopt]="nvidia-modelopt==0.47.0 transformers==5.14.1 requests accelerate"
  [llmcompressor]="llmcompressor==0.14.0.1 transformers==5.17.0 datasets"
)
declare -A CHECKS=(
  [modelopt]="import importlib.metadata as m; assert m.version('nvidia-modelopt')=='0.47.0' and m.version('transformers')=='5.14.1'; import torch, modelopt.torch.quantization; print('OK')"
  [llmcompressor]="import importlib.metadata as m; assert m.version('llmcompressor')=='0.14.0.1' and m.version('transformers')=='5.17.0'; import torch, datasets, llmcompressor; print('OK')"
)

setup_one() {
  local name="$1" venv="$PEERS_DIR/$1"
  if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "${CHECKS[$name]}" 2>/dev/null | grep -q OK; then
    echo "[setup] $name: already installed at $venv"
    return 0
  fi
  echo "[setup] $name: creating $venv"
  local t0=$SECONDS
  [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$TORCH_SPEC"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet "$TORCH_SPEC" ${SPECS[$name]}
  "$venv/bin/python" -c "${CHECKS[$name]}"
  echo "[setup] $name: done in $((SECONDS - t0)) s, $(du -sh "$venv" | cut -f1) on disk"
}

if [[ $# -eq 0 ]]; then set -- modelopt llmcompressor; fi
for name in "$@"; do
  [[ -n "${SPECS[$name]:-}" ]] || { echo "unknown peer '$name' (modelopt|llmcompressor)" >&2; exit 2; }
  setup_one "$name"
done
