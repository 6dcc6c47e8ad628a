#!/usr/bin/env bash
# One command for a lent GPU machine (torch + triton installed, no network, maybe no diffusers):
#
#   bash bench/gpu.sh [--stage smoke|tests|bench|sd|all|session] [--quick] [extra python -m bench options]
#
#   --stage smoke   the GPU-only paths in about two minutes (tests of the direct launches, the
#                   captured loop, the operator, the noise; the main job on the GPU)
#   --stage tests   the test suite on CUDA tensors with the real compiler (no interpreter)
#   --stage loops   the loop timings alone: the captured loop (bench.gpu_graph), host cost
#   --stage bench   the benchmark (python -m bench; --quick for the small matrix)
#   --stage sd      Stable Diffusion end to end (python -m bench.sd: SD 1.5's architecture,
#                   rows a-f; needs diffusers and transformers); extra options go to bench.sd,
#                   e.g. --rows abde --batches 1 4 16; limit GPU_SD_S (default 540)
#   --stage all     (default) tests, then the quick benchmark, then the full one
#   --stage session one device call of about 450 s (GPU_SESSION_S=440 for the stages), the
#                   timings first on a quiet machine, each stage under its own limit so a slow
#                   one cannot eat the rest, its elapsed seconds printed and kept in STATUS:
#                   host cost per step (bench.host --device cuda, GPU_HOST_S=50), the captured
#                   loop (bench.gpu_graph, GPU_GRAPH_S=50), the quick step matrix without loops
#                   (python -m bench --quick --skip-loops, GPU_BENCH_S=100), then the test
#                   suite (GPU_TEST_WORKERS=16 workers; GPU_TESTS_S defaults to what is left)
#
# Carried wheels: every .whl/*.whl (e.g. diffusers, on a machine without a package index) is
# installed into /tmp/site first (no index, no dependencies) and put on PYTHONPATH.
#
# Each bench stage first times the captured CUDA-graph loop (bench.gpu_graph), the host
# cost per fused step (bench.host --device cuda) and `ddim-fused generate` throughput
# (bench.throughput --device cuda), then runs the matrix (python -m bench).
#
# Every step runs under `timeout` (seconds; override with GPU_SMOKE_S, GPU_TESTS_S,
# GPU_BENCH_S, GPU_GRAPH_S, GPU_HOST_S, GPU_THROUGHPUT_S), so a hung or slow step is
# recorded as such ("exit 124") and the next one still runs. The tests run in parallel
# when pytest-xdist is installed (GPU_TEST_WORKERS workers, default 12); at their limit
# they are interrupted, so the failures so far are still listed. A failing stage never
# stops the next one: the benchmark still runs after failed tests, and its results say so
# (results.json "tests_status", the first line of results.txt, and STATUS). Without
# diffusers, its tests skip and its baseline is not timed, each with that reason in the
# logs.
#
# Everything lands in bench/results/gpu-<date>-<HHMM>/: STATUS (one line per stage), tests.log,
# bench[-quick].log and the runner's results.{json,csv,txt,png} under bench[-quick]/.
# When OUT is set (the device tool copies $OUT back, a few files only), the folder is also
# packed into "$OUT/gpu-<date>-<HHMM>.tar.gz" after every step, so a later timeout keeps it.
# Set DDIM_FUSED_COMMIT to the commit the tree holds (git rev-parse HEAD where the tree was
# copied from): a lent machine's copy of the tree may carry a stale .git, and every result
# file records that commit (bench.timing.source_commit).
# Exits non-zero if any stage failed.
set -u -o pipefail
cd "$(dirname "$0")/.."

STAGE=all
QUICK=""
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --stage) STAGE=${2:-}; shift 2 ;;
        --stage=*) STAGE=${1#--stage=}; shift ;;
        --quick) QUICK=--quick; shift ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
case "$STAGE" in
    smoke|tests|loops|bench|sd|all|session) ;;
    *) echo "gpu.sh: error: --stage must be smoke, tests, loops, bench, sd, all or session, got '$STAGE'" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || echo "gpu.sh: installing the carried wheels in .whl/ failed; going on without them" >&2
fi
STAMP=$(date -u +%Y-%m-%d-%H%M)  # one folder per call: never mixed with an earlier run's
DEST=bench/results/gpu-$STAMP
mkdir -p "$DEST"
pack() {  # the results folder as one file under $OUT (written aside, then renamed)
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/.gpu-$STAMP.tar.gz.part" -C "$(dirname "$DEST")" "$(basename "$DEST")" \
        && mv "$OUT/.gpu-$STAMP.tar.gz.part" "$OUT/gpu-$STAMP.tar.gz"
}
# The real compiler: tests/conftest.py picks CUDA tensors when a GPU is present.
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1
    $PY -c "import diffusers; print('diffusers', diffusers.__version__)" 2>/dev/null \
        || echo "diffusers: not installed (its tests and baseline are skipped)"
    echo "commit ${DDIM_FUSED_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"
} >"$DEST/environment.log" 2>&1
pack
# The checkout itself, never installed (these machines have no package index to build
# with).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

FAILED=0
status() {  # status STAGE EXIT_CODE: one line in STATUS, then pack
    local verdict=passed
    [ "$2" -eq 0 ] || { verdict="FAILED (exit $2$( [ "$2" -eq 124 ] && echo ': timed out'))"; FAILED=1; }
    echo "$1: $verdict" | tee -a "$DEST/STATUS"
    pack
}
XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_TEST_WORKERS:-12}")

run_tests() {
    echo "== tests on the GPU (no interpreter)"
    # SIGINT at the limit: pytest then still prints the failures and skips it has so far.
    timeout -s INT -k 30 "${GPU_TESTS_S:-300}" $PY -m pytest tests/ -v --tb=short -rfEs -p no:cacheprovider \
        --durations=25 \
        ${XDIST[@]+"${XDIST[@]}"} 2>&1 | tee "$DEST/tests.log"
    local code=${PIPESTATUS[0]}
    status tests "$code"
    TESTS_STATUS="tests $( [ "$code" -eq 0 ] && echo passed || echo "FAILED (exit $code)") in this call"
}

run_loops() {  # run_loops NAME: the short loop timings, into $DEST/NAME
    # The whole loop captured as one CUDA graph against the uncaptured loop and diffusers';
    # the host cost per fused step on the GPU path.
    echo "== CUDA-graph loop and host cost"
    timeout "${GPU_GRAPH_S:-120}" $PY -m bench.gpu_graph --out-dir "$DEST/$1" 2>&1 | tee -a "$DEST/$1.log"
    status "$1-graph" "${PIPESTATUS[0]}"
    timeout "${GPU_HOST_S:-60}" $PY -m bench.host --device cuda --out-dir "$DEST/$1" 2>&1 \
        | tee -a "$DEST/$1.log"
    status "$1-host" "${PIPESTATUS[0]}"
}

run_bench() {  # run_bench [--quick] [--loops-done]
    local name=bench${1:+-quick}
    echo "== benchmark ${1:-full}"
    [ "${2:-}" = --loops-done ] || run_loops "$name"
    # ddim-fused generate's samples/s on the GPU, one fresh process per model.
    timeout "${GPU_THROUGHPUT_S:-150}" $PY -m bench.throughput --device cuda --threads 1 ${1:+--quick} \
        --out "$DEST/$name/throughput.json" 2>&1 | tee -a "$DEST/$name.log"
    status "$name-throughput" "${PIPESTATUS[0]}"
    BENCH_TESTS_STATUS=${TESTS_STATUS:-"tests not run in this call"} \
        timeout "${GPU_BENCH_S:-420}" $PY -m bench --out-dir "$DEST/$name" ${1:+"$1"} ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 \
        | tee -a "$DEST/$name.log"
    status "$name" "${PIPESTATUS[0]}"
}

run_smoke() {
    # The GPU-only paths first, in about two minutes: the sampler's direct launches, the
    # captured loop, the operator under torch.compile, the fast-noise bound, the static
    # compile check, and the main job on the GPU (its PNG lands in the results folder).
    echo "== smoke: the GPU-only paths"
    timeout -s INT -k 20 "${GPU_SMOKE_S:-150}" $PY -m pytest -q --tb=short -rfEs -p no:cacheprovider tests/test_graph.py \
        tests/test_ops.py tests/test_host_cost.py tests/test_noise.py tests/test_kernel_compiles.py \
        tests/test_sampler_parity.py 2>&1 | tee "$DEST/smoke.log"
    status smoke-tests "${PIPESTATUS[0]}"
    timeout 60 $PY -m ddim_fused sample --device cuda --out "$DEST/samples-cuda.png" 2>&1 | tee -a "$DEST/smoke.log"
    status smoke-sample "${PIPESTATUS[0]}"
}

timed() {  # timed NAME LIMIT_S [timeout options] -- COMMAND...: COMMAND under its limit, into NAME.log and STATUS
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    local opts=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    echo "== $name (limit ${limit} s)"
    timeout ${opts[@]+"${opts[@]}"} "$limit" "$@" 2>&1 | tee "$DEST/$name.log"
    local code=${PIPESTATUS[0]}
    echo "== $name: $((SECONDS - start)) s (limit ${limit} s)" | tee -a "$DEST/$name.log"
    echo "$name elapsed: $((SECONDS - start)) s of ${limit} s" >>"$DEST/STATUS"
    status "$name" "$code"
    return "$code"
}

run_session() {  # the whole session within GPU_SESSION_S (default 440 s)
    # The timings first, on a quiet machine (a test stage leaves 16 workers' load behind it
    # for a minute or more); the tests then get what the session has left (at least 60 s).
    local start=$SECONDS session=${GPU_SESSION_S:-440} graph_s=${GPU_GRAPH_S:-50} bench_s=${GPU_BENCH_S:-100}
    timed host "${GPU_HOST_S:-50}" -k 10 -- $PY -m bench.host --device cuda --out-dir "$DEST/host"
    timed graph "$graph_s" -k 10 -- $PY -m bench.gpu_graph --out-dir "$DEST/graph"
    export BENCH_TESTS_STATUS="tests run after the timings in this call: see STATUS"
    timed bench-quick "$bench_s" -s INT -k 10 -- \
        $PY -m bench --quick --skip-loops --out-dir "$DEST/bench-quick" ${EXTRA[@]+"${EXTRA[@]}"}
    local tests_s=$(( session - (SECONDS - start) - 10 ))
    [ "$tests_s" -ge 60 ] || tests_s=60
    tests_s=${GPU_TESTS_S:-$tests_s}
    local workers=()
    $PY -c "import xdist" 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-16}")
    # SIGINT at the limit: pytest then still prints the failures and skips it has so far.
    timed tests "$tests_s" -s INT -k 20 -- $PY -m pytest tests/ -q --tb=short -rfEs -p no:cacheprovider \
        --durations=15 ${workers[@]+"${workers[@]}"}
    echo "session: $((SECONDS - start)) s of ${session} s" | tee -a "$DEST/STATUS"
    pack
}

run_sd() {
    # bench.sd prints (and appends to sd/sd.jsonl) a line per row as it finishes, so the rows
    # done before the limit are kept; SIGINT lets it end cleanly.
    timed sd "${GPU_SD_S:-540}" -s INT -k 30 -- $PY -m bench.sd --out "$DEST/sd" ${EXTRA[@]+"${EXTRA[@]}"}
}

case "$STAGE" in
    smoke) run_smoke ;;
    sd) run_sd ;;
    tests) run_tests ;;
    loops) run_loops bench-quick ;;
    bench) run_bench $QUICK ;;
    all) run_tests; run_bench --quick; [ -n "$QUICK" ] || run_bench ;;
    session) run_session ;;
esac
echo "results in $DEST"
exit "$FAILED"
