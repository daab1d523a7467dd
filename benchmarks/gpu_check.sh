#!/usr/bin/env bash
# The prepared device check (see benchmarks/gpu_check.py): CUDA correctness of the engine in float32 and
# bfloat16, host overhead per decode step, and the benchmark on random-weight models shaped like
# Llama-3.2-1B and Llama-3.1-8B, and the HTTP server under 64 concurrent streams. JSON goes to
# $OUT/gpu_check.json (written after every step). About 3 minutes on one H200 (2026-11-27, fewer steps then);
# steps that would start past --deadline-s (560 s) are recorded as not started.
#
# For a bare NVIDIA machine with Python 3.12, torch and transformers installed and no internet:
#   prepare once here, in the checkout (.whl/ is git-ignored; carry it):
#     .venv/bin/python -m benchmarks.gpu_check --save-tokenizer .whl/tokenizer     # SmolLM2's tokenizer, 3.4 MB
#   and what the machine lacks (seen on the H200 image, 2026-11: transformers 5.17, no llguidance, no server packages):
#     ../shared/device/wheels.sh transformers==5.24.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 \
#       pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.54.0 \
#       typing-extensions==4.16.0 opentelemetry-api==1.45.2 annotated-doc==0.0.7
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_31_x86_64 -d .whl llguidance==1.9.1
#   (that image has pytest, httpx and the rest; 23 MB of wheels in all)
#   there:
#     bash benchmarks/gpu_check.sh            # or: bash benchmarks/gpu_check.sh --cpu-dry-run (the CPU, tiny models)
#   then here, with its JSON kept as docs/gpu_check_<device>_<date>.json:
#     .venv/bin/python -m benchmarks.gpu_table docs/gpu_check_h200_2026-11-27.json docs/gpu_check_<device>_<date>.json
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dry=false
for arg in "$@"; do [ "$arg" = --cpu-dry-run ] && dry=true; done
if ! $dry && ls .whl/*.whl >/dev/null 2>&1; then  # the wheels are for the device (Python 3.12), not a dry run here
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The paged decode kernel: compiled on the GPU; on the CPU dry run, Triton's interpreter (chosen before Triton loads).
if $dry; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
args=(--out "$OUT")
if [ -d .whl/tokenizer ]; then args+=(--tokenizer .whl/tokenizer); fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
exec "$PY" -m benchmarks.gpu_check "${args[@]}" "$@"
