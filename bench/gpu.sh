#!/usr/bin/env bash
# One command for a lent GPU machine (torch + triton installed, no network):
#   bash bench/gpu.sh [--quick] [extra python -m bench options]
# 1. makes the package importable (pip install -e . --no-deps, else PYTHONPATH);
# 2. runs the test suite on the GPU with the real compiler (TRITON_INTERPRET unset);
# 3. runs the full benchmark (or --quick) and pytest-benchmark's step/loop cases.
# Everything lands in "$OUT/gpu-<date>/" when OUT is set (the device tool copies $OUT
# back), else in bench/results/gpu-<date>/. Exits non-zero if the tests or the
# benchmark's parity gate fail.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y-%m-%d)
DEST=${OUT:+$OUT/gpu-$STAMP}
DEST=${DEST:-bench/results/gpu-$STAMP}
mkdir -p "$DEST"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

# At most 8 files come back from $OUT: tests.log, bench.log, results.{json,csv,png,txt},
# rows.jsonl (what a run cut short had measured) and pytest-benchmark.json.
{
    if ! $PY -m pip install -q -e . --no-deps --no-build-isolation 2>&1; then
        echo "pip install -e . failed; using PYTHONPATH"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    git rev-parse HEAD 2>/dev/null
} >"$DEST/tests.log" 2>&1
$PY -c "import ddim_fused" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== tests on the GPU (no interpreter)"
$PY -m pytest tests/ -q -p no:cacheprovider 2>&1 | tee -a "$DEST/tests.log"
TESTS=${PIPESTATUS[0]}
if [ "$TESTS" -ne 0 ]; then
    echo "tests failed (exit $TESTS): benchmark not run; see $DEST/tests.log"
    exit "$TESTS"
fi

echo "== benchmark"
$PY -m bench --out-dir "$DEST" "$@" 2>&1 | tee "$DEST/bench.log"
BENCH=${PIPESTATUS[0]}

echo "== pytest-benchmark (step and loop cases)"
$PY -m pytest bench/test_step.py bench/test_loop.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-max-time=0.1 --benchmark-json="$DEST/pytest-benchmark.json" 2>&1 | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || [ "$BENCH" -ne 0 ] || BENCH=1
echo "results in $DEST"
exit "$BENCH"
