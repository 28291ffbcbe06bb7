#!/usr/bin/env bash
# Builds fastdiff._C here for another Python (default: 3.12, the GPU machine's) into
# .whl/prebuilt/, the fallback run_gpu_suite.sh uses there when neither pip nor setup.py can
# build it. From the repository root:
#
#     bash benchmarks/prebuild_c.sh                       # python3.12 from PATH
#     PY=/root/.pyenv/versions/3.12.1/bin/python bash benchmarks/prebuild_c.sh
#
# Only that Python's headers and EXT_SUFFIX are needed, not its setuptools or pybind11: the
# pybind11 headers come from any Python here that has pybind11 (they do not depend on the Python
# version). The build is g++ -O2 -std=c++17, as setup.py's. csrc.sha256 records the sources, so
# the suite refuses a .so built from other sources. Whether a .so built on this machine loads on
# the GPU machine (its glibc and libstdc++) is only known once it has been tried there: the suite
# says so in results.md.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PY:-python3.12}
command -v "$PY" >/dev/null || { echo "prebuild_c.sh: no $PY here; set PY=/path/to/python3.12" >&2; exit 2; }
INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
SUFFIX=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
PYBIND=$("$PY" -c "import pybind11; print(pybind11.get_include())" 2>/dev/null \
         || python3 -c "import pybind11; print(pybind11.get_include())")
mkdir -p .whl/prebuilt
rm -f .whl/prebuilt/_C*.so
g++ -O2 -std=c++17 -shared -fPIC -fvisibility=hidden -g0 -I"$PYBIND" -I"$INC" \
    csrc/module.cpp csrc/schedules.cpp csrc/tables.cpp -o ".whl/prebuilt/_C$SUFFIX"
(cd csrc && sha256sum -- *) | sha256sum | cut -c1-16 > .whl/prebuilt/csrc.sha256  # same line in run_gpu_suite.sh
echo "built $(date -u '+%Y-%m-%d') from commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') by $("$PY" -V 2>&1) on $(. /etc/os-release && echo "$PRETTY_NAME"), $(ldd --version | head -n1)" \
    > .whl/prebuilt/built.txt
# Loads under that Python? (numpy is needed only when a table is built, not at import.)
"$PY" - ".whl/prebuilt/_C$SUFFIX" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(f"{sys.argv[1]} loads under Python {sys.version.split()[0]}: {len(mod.COLUMNS)} table columns")
EOF
ls -la .whl/prebuilt
