#!/usr/bin/env bash
# One command for a lent GPU: the Pallas tile sweep, the accelerator benchmark, then the test suite,
# budgeted to about 9 minutes (150 s + 150 s + 240 s, and the time-outs' grace).
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from anywhere in the checkout
#   bash benchmarks/gpu_check.sh --dry-run   # here, on a CPU: the same steps at tiny sizes (< 1 min)
#
# Steps (each one's failure is printed and the next still runs):
#   1. Liger-Kernel from the wheels in .whl/ when there are any, into $SITE, put on PYTHONPATH.
#      A GPU machine without network needs the wheel brought along: download it first, on a
#      machine with pip access, in the repository root (`make gpu-wheels` does the same):
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#          --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
#      (.whl/ is ignored by git: copy or carry it with the checkout.) Installed here with:
#        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#          --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   2. The environment: GPU, driver, versions.
#   2b. `benchmarks/pallas_sweep.py`: the Pallas divergence kernel's tiles at N=8192, V=131072
#      (bf16), against the chunked kernel, under $SWEEP_BUDGET_S s; its best tiles are passed to
#      the benchmark (--pallas-tiles), whose "implementation='pallas'" rows use them.
#   3. `benchmarks/run.py --gpu`: KL forward and rmse-barrier value+grad at N=8192, V=131072
#      (bf16, f32) and the fused JSD at BT=8192, H=4096, V=128256 (bf16), klagg against
#      jax.numpy, optax, torch eager / torch.compile and Liger-Kernel (and klagg's
#      implementation='xla' / 'pallas' rows), with floors and agreement
#      checks, under a budget of $BENCH_BUDGET_S s (rows that would start later are skipped) and a
#      hard limit $BENCH_GRACE_S s beyond it. If it dies (not a time-out), it is run again without
#      the PyTorch peers with what time is left.
#   4. The test suite (`pytest -n 8` when pytest-xdist is there), stopped after $TEST_BUDGET_S s
#      with the summary of what ran.
# Everything lands in $OUT (default benchmarks/out/gpu-check): run.py's
# <device-kind>-<date>.{md,json,png}, gpu_check.log (all output), pytest.log.
# Knobs (environment): OUT, PYTHON (python3), SITE (/tmp/site), SWEEP_BUDGET_S (150),
# BENCH_BUDGET_S (150), BENCH_GRACE_S (60), TEST_BUDGET_S (240), PYTEST_WORKERS (8).

set -u
export PYTHONUNBUFFERED=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
[ "${TINY:-0}" = "1" ] && DRY=1

PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
SWEEP_BUDGET_S="${SWEEP_BUDGET_S:-150}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-150}"
BENCH_GRACE_S="${BENCH_GRACE_S:-60}"
TEST_BUDGET_S="${TEST_BUDGET_S:-240}"
PYTEST_WORKERS="${PYTEST_WORKERS:-8}"
if [ "$DRY" = 1 ]; then
  OUT="${OUT:-$ROOT/benchmarks/out/gpu-check-dry}"
  SWEEP_BUDGET_S=20
  BENCH_BUDGET_S="${BENCH_BUDGET_S_DRY:-40}"
  BENCH_GRACE_S=20
  TEST_BUDGET_S=40
  SITE="$(mktemp -d)"
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# JAX grows its GPU memory on demand instead of taking 75 % up front: PyTorch shares the device
# in the benchmark, and eight test workers share it in step 4.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

step() { echo; echo "=== [$((SECONDS))s] $*"; }

step "gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run') in $ROOT, output in $OUT"

# 1. Liger-Kernel (and any other wheel carried in .whl/).
step "1. wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$SITE"
    echo "installed into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    echo "note: installing .whl/*.whl failed; the Liger-Kernel rows will be skipped"
  fi
else
  echo "note: no .whl/*.whl here; the Liger-Kernel rows will be skipped unless it is installed"
  echo "      (make gpu-wheels, on a machine with pip access, puts liger-kernel's wheel there)"
fi

# 2. Environment.
step "2. environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader || echo "(no nvidia-smi)"
"$PY" - <<'EOF' || echo "note: the environment probe failed"
import importlib.metadata as md
import sys
print("python", sys.version.split()[0], sys.executable)
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "optax", "numpy", "torch",
             "triton", "liger-kernel", "pytest", "pytest-xdist", "hypothesis", "flax"):
  try:
    print(f"  {name} {md.version(name)}")
  except md.PackageNotFoundError:
    pass
import jax
print("jax devices:", jax.devices(), "kind:", jax.devices()[0].device_kind)
EOF

# 2b. The Pallas tile sweep.
step "2b. Pallas tile sweep (budget ${SWEEP_BUDGET_S} s)"
SWEEP_ARGS=(--budget-s "$SWEEP_BUDGET_S" --out "$OUT")
[ "$DRY" = 1 ] && SWEEP_ARGS+=(--tiny)
timeout -k 15 $((SWEEP_BUDGET_S + 60)) "$PY" benchmarks/pallas_sweep.py "${SWEEP_ARGS[@]}"
echo "sweep exit status $?"
SWEEP_JSON="$(ls -t "$OUT"/pallas-sweep-*.json 2>/dev/null | head -n 1)"

# 3. The benchmark.
step "3. benchmark (budget ${BENCH_BUDGET_S} s, hard limit $((BENCH_BUDGET_S + BENCH_GRACE_S)) s)"
BENCH_ARGS=(--gpu --budget-s "$BENCH_BUDGET_S" --out "$OUT")
[ "$DRY" = 1 ] && BENCH_ARGS+=(--tiny)
[ -n "$SWEEP_JSON" ] && BENCH_ARGS+=(--pallas-tiles "$SWEEP_JSON")
start=$SECONDS
timeout -k 15 $((BENCH_BUDGET_S + BENCH_GRACE_S)) "$PY" benchmarks/run.py "${BENCH_ARGS[@]}"
rc=$?
echo "benchmark exit status $rc after $((SECONDS - start)) s"
left=$((BENCH_BUDGET_S - (SECONDS - start)))
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ] && [ "$left" -gt 20 ]; then
  step "3b. the benchmark died (status $rc): again without the PyTorch peers, budget $left s"
  timeout -k 15 $((left + BENCH_GRACE_S)) "$PY" benchmarks/run.py "${BENCH_ARGS[@]}" \
    --budget-s "$left" --no-torch --no-plot --suffix=-jax-only
  echo "jax-only benchmark exit status $?"
fi

# 4. The test suite.
step "4. test suite (stopped after ${TEST_BUDGET_S} s)"
# pytest-benchmark, where installed, refuses to run beside xdist with a warning that the
# project's filterwarnings=error turns into an error: it is not used here.
PYTEST_ARGS=(-q -p no:cacheprovider -p no:benchmark -rfE)
if "$PY" -c "import xdist" 2>/dev/null; then
  PYTEST_ARGS+=(-n "$PYTEST_WORKERS")
else
  echo "note: pytest-xdist not importable: running serially"
fi
[ "$DRY" = 1 ] && PYTEST_ARGS+=(--collect-only)
start=$SECONDS
# SIGINT first: pytest then prints its summary (failures so far) before it exits.
timeout -s INT -k 20 "$TEST_BUDGET_S" "$PY" -m pytest "${PYTEST_ARGS[@]}" tests \
  >"$OUT/pytest.log" 2>&1
rc=$?
echo "pytest exit status $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (time limit)')"
tail -n 25 "$OUT/pytest.log"

step "done in ${SECONDS} s; files in $OUT:"
ls -l "$OUT"
grep -h -A 20 '^### Agreement' "$OUT"/*.md 2>/dev/null | grep '^- ' || true
sleep 1  # let tee write the last lines to gpu_check.log
