#!/usr/bin/env bash
# The GPU suite in one short device call: build fastdiff._C, run the `gpu` tests, then the step,
# loop and end-to-end benchmarks, writing every table to $OUT/results.md (./out when OUT is unset).
# From the repository root:
#
#     FASTDIFF_COMMIT=<sha> bash benchmarks/run_gpu_suite.sh            # everything, <= 420 s
#     FASTDIFF_COMMIT=<sha> bash benchmarks/run_gpu_suite.sh step e2e   # a rerun of some phases
#     FASTDIFF_SUITE_DRY=1 bash benchmarks/run_gpu_suite.sh             # dry run (automatic without CUDA)
#
# Why it looks like this: a GPU is lent to some sessions only, for 15 minutes of device time,
# machine start included, so one call must bring back everything, and leave time for a rerun:
# * a whole-run budget (SUITE_BUDGET_S, default 420 s: a run(timeout_s=480) call ends with a
#   minute to spare), split into phase caps (SUITE_<PHASE>_S), each shortened to what is left;
# * phases in the order tests -> step -> loop -> e2e (cheap and most wanted first); the CPU tests
#   are not run here (CI runs them);
# * each benchmark gets a deadline (--deadline, epoch seconds) a few seconds before its cap, so
#   it turns what no longer fits into "skipped" rows and exits by itself; `timeout` is the
#   backstop for a hang, and costs only that phase;
# * every variant of every benchmark in its own try (an error row, the table goes on), and every
#   row rewrites $OUT/<phase>.json and $OUT/results.md: a call cut off keeps what it measured;
# * results.md is also assembled after each phase and in the exit trap; $OUT gets 6 files (the
#   device tool brings back at most 8): suite.log, results.md, step.json, loop.json, e2e.json,
#   e2e_speedup.png;
# * .git does not travel to the GPU machine: pass the commit in FASTDIFF_COMMIT; every table
#   also records a hash of the sources (python benchmarks/bench_gpu_common.py --source-hash);
# * fastdiff._C is built there (the device's Python is 3.12; a .so built for another Python does
#   not load): pip install --no-build-isolation -e ., else setup.py build_ext --inplace, else a
#   carried .whl/prebuilt/_C<EXT_SUFFIX> built from the same csrc/ (benchmarks/prebuild_c.sh);
#   results.md says which, and why the others failed.
#
# Environment: SUITE_BUDGET_S, SUITE_{SETUP,TESTS,STEP,LOOP,E2E}_S (phase caps, s),
# SUITE_TEST_TIMEOUT_S (per test, s; needs pytest-timeout), SUITE_PYTEST_ARGS (default: tests),
# SUITE_{STEP,LOOP,E2E}_ARGS (extra arguments for a benchmark, e.g. "--families ocm --sizes 16M"),
# FASTDIFF_SUITE_DRY (1: dry run; 0: never; default: dry when torch sees no CUDA device),
# FASTDIFF_SUITE_INJECT (make chosen variants fail or hang: see bench_gpu_common.py).
# Exit status: 0 when every phase ran and passed; 1 otherwise (later phases still run).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"
# Our own files only: a local rerun into ./out must not mix in tables from an older run.
rm -f "$OUT"/{suite.log,results.md,step.json,loop.json,e2e.json,e2e_speedup.png} "$OUT"/.*.tmp
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-suite.XXXXXX")
export FASTDIFF_SUITE_WORK=$WORK PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-420}
END=$((START + BUDGET))
# Caps sum to more than the budget on purpose: a phase that ends early leaves its time to the
# next ones, and e2e (last, and the one with the slowest compiles) takes what is left.
declare -A CAP=([setup]=${SUITE_SETUP_S:-90} [tests]=${SUITE_TESTS_S:-100} [step]=${SUITE_STEP_S:-110}
                [loop]=${SUITE_LOOP_S:-35} [e2e]=${SUITE_E2E_S:-150})
GRACE=8        # s between a benchmark's deadline and its cap: saving files, the interpreter's exit
MIN_PHASE=15   # s: a phase with less left is skipped (importing torch alone takes a few)
REPORT_RESERVE=3
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(tests step loop e2e)
read -r -a PYTEST_ARGS <<< "${SUITE_PYTEST_ARGS:-tests}"
STATUS=0

say() { printf '\n===== %s  [%ss elapsed] =====\n' "$*" "$(( $(date +%s) - START ))"; }
setup_line() { printf '%s\n' "$*" >> "$WORK/setup.md"; }
record() {  # record PHASE STATUS SECONDS NOTE: one line of results.md's phase table (the last wins)
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >> "$WORK/phases.tsv"
}
report() {
    python3 benchmarks/suite_report.py --out "$OUT" --work "$WORK" >/dev/null \
        || echo "[results.md: suite_report.py failed (see above)]"
}

# phase NAME CMD...: run CMD under the phase's cap, shortened to what is left of the budget.
# The word @DEADLINE@ in CMD becomes the epoch second by which the command should be done.
phase() {
    local name=$1; shift
    local now left cap rc t0 secs note
    now=$(date +%s)
    left=$((END - now - REPORT_RESERVE))
    cap=${CAP[$name]}
    (( cap > left )) && cap=$left
    if (( cap < MIN_PHASE )); then
        record "$name" skipped 0 "budget spent: ${left}s left of ${BUDGET}s, a phase needs ${MIN_PHASE}s"
        say "$name: SKIPPED (budget spent)"; STATUS=1; report; return
    fi
    local args=("${@//@DEADLINE@/$((now + cap - GRACE))}")
    record "$name" running 0 "cap ${cap}s"
    report
    say "$name (cap ${cap}s): ${args[*]}"
    t0=$(date +%s)
    timeout -k 5 "$cap" "${args[@]}" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    secs=$(( $(date +%s) - t0 ))
    if (( rc == 124 || rc == 137 )); then
        note="killed at its ${cap}s cap (rows so far kept)"; record "$name" "TIMED OUT" "$secs" "$note"; STATUS=1
    elif (( rc != 0 )); then
        if [ "$name" = tests ]; then note="pytest exit $rc (failures below)"
        else note="exit $rc (error rows in its table; tracebacks in suite.log)"; fi
        record "$name" FAILED "$secs" "$note"; STATUS=1
    else
        record "$name" ok "$secs" ""
    fi
    say "$name: $(tail -n1 "$WORK/phases.tsv" | cut -f2,4)"
    report
}

finish() {
    local rc=$?
    (( rc != 0 && STATUS == 0 )) && STATUS=$rc
    report
    say "done (status $STATUS): files in $OUT"
    ls -la "$OUT"
    local n
    n=$(find "$OUT" -maxdepth 2 -type f | wc -l)
    (( n > 8 )) && echo "WARNING: $n files in $OUT; the device tool brings back at most 8"
    rm -rf "$WORK"
    exit "$STATUS"
}

# The device's Python may differ from the one that built a .so here: try each way, say which worked.
# Loads, and is this tree's: an editable install of another checkout (this CPU machine has one of
# /work/main) would otherwise hand its own _C to a tree that has none.
c_loads() {
    PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} python3 -c \
        "import sys, fastdiff._C as c; sys.exit(0 if c.__file__.startswith(sys.argv[1]) else 3)" "$ROOT/" >/dev/null 2>&1
}
csrc_hash() { (cd csrc && sha256sum -- *) | sha256sum | cut -c1-16; }  # same line in prebuild_c.sh
last_line() { grep -v '^\s*$' "$1" | tail -n1 | cut -c1-200; }
join() { local out="" x; for x in "$@"; do out+="${out:+; }$x"; done; printf '%s' "$out"; }
build_c() {
    local suffix tried=() pre
    suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    if [ -n "$DRY" ] && c_loads; then
        BUILT="already built in the tree (dry run: no build, no pip install on this machine)"; return 0
    fi
    if [ -z "$DRY" ]; then
        if timeout "${CAP[setup]}" python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
                > "$WORK/build_pip.log" 2>&1 && c_loads; then
            BUILT="pip install --no-build-isolation -e ."; return 0
        fi
        tried+=("pip: $(last_line "$WORK/build_pip.log")")
    fi
    if timeout "${CAP[setup]}" python3 setup.py build_ext --inplace -q > "$WORK/build_setup.log" 2>&1 && c_loads; then
        BUILT="setup.py build_ext --inplace${tried:+ (after $(join "${tried[@]}"))}"; return 0
    fi
    tried+=("setup.py: $(last_line "$WORK/build_setup.log")")
    pre=.whl/prebuilt/_C$suffix
    if [ ! -f "$pre" ]; then
        tried+=("prebuilt: no $pre (this Python needs $suffix; found: $(ls .whl/prebuilt 2>/dev/null | tr '\n' ' '))")
    elif [ "$(cat .whl/prebuilt/csrc.sha256 2>/dev/null)" != "$(csrc_hash)" ]; then
        tried+=("prebuilt: $pre was built from other csrc/ sources (hash $(cat .whl/prebuilt/csrc.sha256 2>/dev/null) != $(csrc_hash))")
    elif cp "$pre" fastdiff/ && c_loads; then
        BUILT="carried prebuilt $pre ($(cat .whl/prebuilt/built.txt 2>/dev/null)), after: $(join "${tried[@]}")"; return 0
    else
        tried+=("prebuilt: $pre does not load: $(PYTHONPATH=$ROOT python3 -c 'import fastdiff._C' 2>&1 | tail -n1)")
    fi
    BUILT="FAILED: $(join "${tried[@]}")"
    return 1
}

main() {
trap finish EXIT
trap 'exit 143' TERM INT   # through finish: results.md is assembled once more
say "setup"
if [ -n "${FASTDIFF_SUITE_DRY+x}" ]; then
    DRY=$([ "$FASTDIFF_SUITE_DRY" = 1 ] && echo 1 || echo)
else
    DRY=$(python3 -c "import torch; print('' if torch.cuda.is_available() else 1)" 2>/dev/null || echo 1)
fi
COMMIT=${FASTDIFF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "UNKNOWN: pass FASTDIFF_COMMIT (.git does not travel)")}
[[ $COMMIT == UNKNOWN* ]] && echo "WARNING: the tables will name no commit: FASTDIFF_COMMIT=<sha> bash $0"
setup_line "started $(date -u '+%Y-%m-%d %H:%M UTC'); commit $COMMIT; budget ${BUDGET}s; phases ${PHASES[*]}"
if [ -n "$DRY" ]; then
    setup_line ""
    setup_line "**DRY RUN** (no CUDA device, or FASTDIFF_SUITE_DRY=1): tiny sizes on the CPU, torch.compile skipped, GPU tests skip. It checks the suite, it measures nothing worth keeping; there are no GPU figures in this file."
fi
setup_line ""
record setup running 0 ""
report
t0=$(date +%s)
if compgen -G ".whl/*.whl" >/dev/null; then
    if [ -n "$DRY" ]; then
        setup_line "* .whl/: not installed (dry run: this machine's own packages are used)"
    elif python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl > "$WORK/wheels.log" 2>&1; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        setup_line "* .whl/ installed to /tmp/site: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    else
        setup_line "* .whl/ install FAILED: $(last_line "$WORK/wheels.log")"; STATUS=1
    fi
else
    setup_line "* .whl/: no wheels carried (diffusers rows will say skipped unless it is installed)"
fi
build_c
setup_line "* fastdiff._C: $BUILT"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader \
    > "$WORK/smi.txt" 2>/dev/null && setup_line "* nvidia-smi: $(head -n1 "$WORK/smi.txt")"
python3 - >> "$WORK/setup.md" 2>&1 <<'EOF'
import importlib.util, platform, sys, torch
import fastdiff
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"* device: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}); python {platform.python_version()}")
for name in ("triton", "diffusers"):
    try:
        print(f"* {name} {__import__(name).__version__}")
    except Exception as exc:
        print(f"* {name}: NOT importable ({type(exc).__name__}: {exc})")
print(f"* fastdiff {fastdiff.__version__} from {fastdiff.__file__}; _C from {fastdiff._C.__file__}")
print("* pytest-timeout: " + ("present" if importlib.util.find_spec("pytest_timeout") else
                              "ABSENT: no per-test timeout, a hung test costs the rest of the tests phase"))
sys.path.insert(0, "benchmarks")
from bench_gpu_common import source_hash
print(f"* source hash {source_hash()} (`python benchmarks/bench_gpu_common.py --source-hash` in a checkout)")
EOF
cat "$WORK/setup.md"
if [[ $BUILT == FAILED* ]]; then
    record setup FAILED $(( $(date +%s) - t0 )) "fastdiff._C could not be built or loaded: every phase skipped"
    for p in "${PHASES[@]}"; do record "$p" skipped 0 "no fastdiff._C"; done
    STATUS=1; return
fi
record setup ok $(( $(date +%s) - t0 )) ""
report

DRYARG=()
[ -n "$DRY" ] && DRYARG=(--dry)
TIMEOUT_ARGS=()
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout="${SUITE_TEST_TIMEOUT_S:-60}")
for p in "${PHASES[@]}"; do
    case $p in
        # the device tests: real kernels compiled for the GPU (tests/conftest.py: FASTDIFF_TEST_CUDA);
        # -v: one line per test, so a cut-off run still says which passed
        tests) phase tests env FASTDIFF_TEST_CUDA=1 python3 -m pytest "${PYTEST_ARGS[@]}" -m gpu -v -rfEs \
                   --continue-on-collection-errors --durations=10 -p no:cacheprovider "${TIMEOUT_ARGS[@]}" ;;
        step)  phase step python3 benchmarks/bench_gpu_step.py --out "$OUT" --deadline @DEADLINE@ "${DRYARG[@]}" \
                   ${SUITE_STEP_ARGS:-} ;;
        loop)  phase loop python3 benchmarks/bench_gpu_loop.py --out "$OUT" --deadline @DEADLINE@ "${DRYARG[@]}" \
                   ${SUITE_LOOP_ARGS:-} ;;
        e2e)   phase e2e python3 benchmarks/bench_gpu_e2e.py --out "$OUT" --deadline @DEADLINE@ "${DRYARG[@]}" \
                   ${SUITE_E2E_ARGS:-} ;;
        *) record "$p" skipped 0 "unknown phase (expected: tests step loop e2e)"; STATUS=1 ;;
    esac
done
}

# tee in a pipeline (not exec > >(tee)) so that the log is complete when the script returns.
main 2>&1 | tee -a "$OUT/suite.log"
exit "${PIPESTATUS[0]}"
