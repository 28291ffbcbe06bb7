#!/usr/bin/env bash
# The GPU suite in one command: install fastdiff, run the `gpu` tests on the device, the GPU
# benchmarks (sampler overhead, end to end, step kernel), then the rest of the test suite as CI
# runs it (CUDA hidden, Triton's interpreter), writing logs, tables and the plot to $OUT (./out
# when OUT is unset). From the repository root:
#
#     bash benchmarks/run_gpu_suite.sh                 # everything (~9 minutes on an H100)
#     bash benchmarks/run_gpu_suite.sh tests loop      # only some phases: tests loop e2e step cputests
#
# diffusers is not on the GPU machines and they have no network: its wheels travel in .whl/
# (see notes/graphs.md for how to fill it); they are installed to /tmp/site when present.
# Each phase has a time cap (SUITE_*_S, seconds) so the whole run ends inside a 10-minute
# limit and a phase that overruns loses only itself. Exit status: non-zero if the tests failed,
# a benchmark failed, or a phase ran out of time; the later phases still run.
#
# A dry run of the script itself on a machine without a GPU (small benchmark sizes, a subset of
# the tests, the package already installed):
#     SUITE_QUICK=1 SUITE_SKIP_INSTALL=1 SUITE_PYTEST_ARGS=tests/test_graphs.py bash benchmarks/run_gpu_suite.sh
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

BUDGET=${SUITE_BUDGET_S:-570}
declare -A CAP=([tests]=${SUITE_TESTS_S:-150} [loop]=${SUITE_LOOP_S:-45} [e2e]=${SUITE_E2E_S:-170}
                [step]=${SUITE_STEP_S:-130} [cputests]=${SUITE_CPUTESTS_S:-240})
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(tests loop e2e step cputests)
XDIST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 8)
QUICK=()
[ -n "${SUITE_QUICK:-}" ] && QUICK=(--quick)
read -r -a PYTEST_ARGS <<< "${SUITE_PYTEST_ARGS:-tests}"
START=$(date +%s)
STATUS=0

say() { printf '\n===== %s  [%ss elapsed] =====\n' "$*" "$(( $(date +%s) - START ))"; }

# Run a phase under its cap, shortened to what is left of the whole budget.
phase() {
    local name=$1; shift
    local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
    local cap=${CAP[$name]}
    (( cap > left )) && cap=$left
    if (( cap < 15 )); then
        say "$name: SKIPPED (time budget spent)"; STATUS=1; return
    fi
    say "$name (cap ${cap}s): $*"
    timeout -k 10 "$cap" "$@"
    local rc=$?
    if (( rc == 124 || rc == 137 )); then say "$name: TIMED OUT after ${cap}s"; STATUS=1
    elif (( rc != 0 )); then say "$name: FAILED (exit $rc)"; STATUS=1
    else say "$name: ok"; fi
}

main() {
say "setup"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { say "installing .whl/ failed"; STATUS=1; }
fi
if [ -z "${SUITE_SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || { say "pip install -e . failed"; return 1; }
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
python3 - <<'EOF'
import torch, triton, fastdiff
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, fastdiff {fastdiff.__version__}")
print("cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
try:
    import diffusers
    print("diffusers", diffusers.__version__)
except Exception as exc:
    print("diffusers NOT importable:", type(exc).__name__, exc)
EOF
git log -1 --format='commit %h %cd %s' 2>/dev/null || true

for p in "${PHASES[@]}"; do
    case $p in
        # the device tests: real kernels compiled for the GPU (tests/conftest.py: FASTDIFF_TEST_CUDA)
        tests) phase tests env FASTDIFF_TEST_CUDA=1 python3 -m pytest "${PYTEST_ARGS[@]}" -m gpu -q -rs \
                   --durations=15 -p no:cacheprovider ;;
        # everything else as CI runs it: no CUDA, Triton kernels through the interpreter
        cputests) phase cputests env CUDA_VISIBLE_DEVICES= python3 -m pytest "${PYTEST_ARGS[@]}" -m "not gpu" -q \
                   "${XDIST[@]}" --durations=10 -p no:cacheprovider ;;
        loop)  phase loop python3 benchmarks/bench_gpu_loop.py --out "$OUT" "${QUICK[@]}" ;;
        e2e)   phase e2e python3 benchmarks/bench_gpu_e2e.py --out "$OUT" --compile-budget "${SUITE_E2E_COMPILE_S:-110}" "${QUICK[@]}" ;;
        step)  phase step python3 benchmarks/bench_gpu_step.py --out "$OUT" --compile-budget "${SUITE_STEP_COMPILE_S:-70}" "${QUICK[@]}" ;;
        *) say "unknown phase '$p' (expected: tests loop e2e step cputests)"; STATUS=1 ;;
    esac
done

# One markdown file with every table (the per-benchmark .json files keep the raw records).
: > "$OUT/results.md"
for name in loop e2e step; do
    if [ -f "$OUT/$name.md" ]; then cat "$OUT/$name.md" >> "$OUT/results.md"; echo >> "$OUT/results.md"; rm -f "$OUT/$name.md"; fi
done
say "done (status $STATUS); files in $OUT:"
ls -la "$OUT"
return $STATUS
}

# tee in a pipeline (not exec > >(tee)) so that the log is complete when the script returns.
main 2>&1 | tee -a "$OUT/suite.log"
exit "${PIPESTATUS[0]}"
