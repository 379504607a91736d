#!/usr/bin/env bash
# GPU check of the Triton kernels: install, GPU tests, benchmark. Logs and JSON go to $OUT (default ./out).
#   bash benchmarks/gpu_check.sh
# The benchmark runs even when the tests fail; the exit status is nonzero if any step failed
# (status.txt in $OUT lists each step's exit code).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package imports even if the editable install fails

{
    echo "== $(date -u +%FT%TZ) on $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    python -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.log"

# The GPU machine has no network: build with the installed setuptools first (an isolated build would try
# to download one), then the plain editable install.
export PIP_DISABLE_PIP_VERSION_CHECK=1
{ python -m pip install --no-deps --no-build-isolation -e . \
    || python -m pip install --no-deps --retries 0 --timeout 10 -e .; } 2>&1 | tee "$OUT/pip.log"
pip_status=${PIPESTATUS[0]}

python -m pytest tests/test_kernels.py -m gpu -x -q -rs 2>&1 | tee "$OUT/tests.log"
test_status=${PIPESTATUS[0]}

python benchmarks/bench_attention.py --sweep --out "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.log"
bench_status=${PIPESTATUS[0]}

echo "pip=$pip_status tests=$test_status bench=$bench_status" | tee "$OUT/status.txt"
[ "$pip_status" -eq 0 ] && [ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
