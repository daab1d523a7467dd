#!/usr/bin/env bash
# The prepared device check (see benchmarks/gpu_check.py): CUDA correctness of the engine in float32 and
# bfloat16, host overhead per decode step, and the benchmark on random-weight models shaped like
# Llama-3.2-1B and Llama-3.1-8B. JSON goes to $OUT/gpu_check.json (written after every step). Under
# 8 minutes on one H100-class GPU (budget: give the run timeout_s 540).
#
# For a bare NVIDIA machine with Python 3.12, torch and transformers installed and no internet:
#   prepare once here, in the checkout (.whl/ is git-ignored; carry it):
#     .venv/bin/python -m benchmarks.gpu_check --save-tokenizer .whl/tokenizer     # SmolLM2's tokenizer, 3.4 MB
#     ../shared/device/wheels.sh pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1     # the test runner
#   and, only if the machine's transformers is not 5.x (the engine's attention hook needs this major version):
#     ../shared/device/wheels.sh transformers==5.24.0 tokenizers==0.23.3 huggingface-hub==2.4.0 hf-xet==1.8.0
#   there:
#     bash benchmarks/gpu_check.sh            # or: bash benchmarks/gpu_check.sh --cpu-dry-run (the CPU, tiny models)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
args=(--out "$OUT")
if [ -d .whl/tokenizer ]; then args+=(--tokenizer .whl/tokenizer); fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
exec "$PY" -m benchmarks.gpu_check "${args[@]}" "$@"
