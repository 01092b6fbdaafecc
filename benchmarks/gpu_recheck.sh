#!/usr/bin/env bash
# After a change, on a lent GPU: the fused LM head's block-size / accumulator sweep at
# Liger-Kernel's setting, then the whole test suite. Output in $OUT (default benchmarks/out/).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 150 python3 benchmarks/fused_sweep.py --chunks 0,512,2048 2>&1 | tee "$OUT/fused_sweep.md"
start=$SECONDS
timeout -s INT -k 20 "${TEST_BUDGET_S:-240}" python3 -m pytest -q -p no:cacheprovider \
  -p no:benchmark -rfE -n "${PYTEST_WORKERS:-8}" tests >"$OUT/pytest.log" 2>&1
echo "pytest exit status $? after $((SECONDS - start)) s"
tail -n 15 "$OUT/pytest.log"
