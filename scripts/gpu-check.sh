#!/usr/bin/env bash
# scripts/gpu-check.sh OUTDIR [--cpu-dry-run]
#
# The whole GPU check in one command, for a machine with one CUDA GPU and torch, transformers and pytest already
# installed (nothing is installed here; matplotlib is optional, without it no PNGs). It runs from a copy of the
# repository with PYTHONPATH=src, in at most ~8 minutes, and leaves in OUTDIR gpu-check.log and at most 8
# JSON/PNG files:
#
#   1. the device subset of the tests on CUDA (BLOCKSTATE_TEST_DEVICE=cuda): streaming = parallel, bf16 autocast
#      with the SSM in fp32, whole-model bf16, save/load, a few training steps of every registered model,
#      torch.compile = eager (tests/models/test_device.py); no host sync in a training step, the decode step's syncs
#      listed (tests/models/test_host_syncs.py); gradient checkpointing = plain gradients (tests/models/test_gradient_checkpointing.py);
#      the static-cache decode step captured as a CUDA graph = the dynamic cache (tests/models/test_static_decode.py)
#   2. bench layers, fp32 and bf16 autocast, forward and forward+backward, 1k-65k: BST variants, Block-Recurrent
#      (ours, and the peer package's when it is importable), sliding window, block-local, full attention
#      -> layers-gpu.{json,png}, layers-gpu-bf16.{json,png}
#   3. bench train at size small: tokens/s, model FLOPs utilisation against the GPU's bf16 peak, the memory
#      gradient checkpointing saves -> train-gpu.{json,png}
#   4. bench generate: ms per token and cache memory vs context, BST:SH also as a CUDA graph per token (--static)
#      and with that step compiled (--compile)
#      -> generation.{json,png}
#   5. the paper's speed goals with our ratios (python -m blockstate.benchmarks.gpu_check OUTDIR)
#
# Without a CUDA device it says so in one line and exits 2. --cpu-dry-run runs the same steps on CPU at tiny
# sizes (under 3 minutes; tests/benchmarks/test_gpu_check.py runs it, so the script cannot rot). Exit status: 0 when every
# step passed, 1 otherwise (the log says which). PYTHON picks the interpreter (default: python3, else python);
# GPU_CHECK_BUDGET the seconds for all steps together (default 450).
set -uo pipefail

usage() { echo "usage: scripts/gpu-check.sh OUTDIR [--cpu-dry-run]" >&2; exit 64; }
OUT="" DRY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    -h | --help) usage ;;
    -*) echo "gpu-check: unknown option $arg" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || usage

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg

if [ "$DRY" = 0 ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu-check: no CUDA device visible to torch (torch.cuda.is_available() is False); --cpu-dry-run runs the same steps on CPU"
    exit 2
  fi
fi

mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu-check.log"
exec > >(tee "$LOG") 2>&1

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-450}
FAILED=()

# step NAME SECONDS COMMAND...: run with a time limit (never past the overall budget), log its status and time
step() {
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    echo "== $name: skipped, the time budget is spent"
    FAILED+=("$name (skipped)")
    return
  fi
  echo
  echo "== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s"
  ((rc == 0)) || FAILED+=("$name (exit $rc$( ((rc == 124)) && echo ', timed out'))")
}

TESTS=(tests/models/test_device.py tests/models/test_host_syncs.py tests/models/test_gradient_checkpointing.py
  tests/models/test_static_decode.py)
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # shared CPUs: spinning OpenMP threads stall everyone
  TEST_SELECT=(-k "bst-sh-s4 or counter or out_of_range")
  LAYER_ARGS=(--layers bst-sh-s4,brect,peer-brect,slide,block,full --lengths 128,256 --dim 32 --heads 4 --block 16
    --state 8 --repeats 1)
  TRAIN_ARGS=(--size tiny --models bst-sh-s4,slide --lengths 128 --steps 1)
  GEN_ARGS=(--contexts 64,128 --steps 2 --repeats 1 --static --compile)
  # generous limits: a loaded 2-core machine runs these steps several times slower than a quiet one (~3 min)
  LIMITS=(150 75 75 100 75)
else
  DEVICE=cuda
  TEST_SELECT=()
  LAYER_ARGS=(--layers bst-sh-s4,bst-mh-s4,bst-mf-s4,bst-sh-unstructured,brect,peer-brect,slide,block,full
    --lengths 1k,2k,4k,8k,16k,32k,65k --repeats 3 --time-limit 3)
  TRAIN_ARGS=(--size small --models bst-sh-s4,bst-mh-s4,bst-mf-s4,bst-sh-s4-gated,gpt,slide,brect,gss-hybrid
    --lengths 1k,4k,16k --steps 3 --time-limit 10)
  GEN_ARGS=(--contexts 1024,16384,65536 --steps 16 --repeats 3 --static --compile)
  LIMITS=(170 60 60 95 65)  # seconds, sized for an H100/H200 (compile tests dominate the first)
fi

echo "gpu-check on $(hostname) at $(date -u +%FT%TZ), device $DEVICE, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET}s"
"$PY" - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
EOF

step tests "${LIMITS[0]}" env BLOCKSTATE_TEST_DEVICE=$DEVICE "$PY" -m pytest -p no:cacheprovider -p no:hypothesispytest -q -rfEs -s \
  "${TESTS[@]}" "${TEST_SELECT[@]}"
step "bench layers fp32" "${LIMITS[1]}" "$PY" -m blockstate bench layers --device $DEVICE "${LAYER_ARGS[@]}" \
  --out "$OUT"
step "bench layers bf16" "${LIMITS[2]}" "$PY" -m blockstate bench layers --device $DEVICE --dtype bfloat16 \
  "${LAYER_ARGS[@]}" --out "$OUT"
step "bench train" "${LIMITS[3]}" "$PY" -m blockstate bench train --device $DEVICE "${TRAIN_ARGS[@]}" \
  --checkpointing --flops --out "$OUT"
step "bench generate" "${LIMITS[4]}" "$PY" -m blockstate bench generate --device $DEVICE "${GEN_ARGS[@]}" \
  --out "$OUT"

echo
"$PY" -m blockstate.benchmarks.gpu_check "$OUT" || FAILED+=("goals report")

FILES=$(find "$OUT" -maxdepth 1 -type f \( -name '*.json' -o -name '*.png' \) | wc -l)
echo
echo "gpu-check: ${FILES} JSON/PNG files and gpu-check.log in $OUT, $(($(date +%s) - START)) s in all"
((FILES <= 8)) || FAILED+=("more than 8 JSON/PNG files in $OUT")
if ((${#FAILED[@]})); then
  printf 'gpu-check: FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "gpu-check: every step passed"
exit 0
