#!/usr/bin/env bash
# GPU checks in one go: the CUDA tests (pytest -m gpu), then the GPU benchmark group.
# Run from the repository root on a machine with a CUDA device and torch installed;
# results go under $OUT (default: ./gpu-out). A Rockpool copy in .whl/site, if present,
# joins the benchmark as the reference.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl/site ]; then export PYTHONPATH="$PYTHONPATH:$PWD/.whl/site"; fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  python3 -c "import triton; print('triton', triton.__version__)" || echo "no triton"
  python3 -c "import rockpool; print('rockpool', rockpool.__version__)" 2>/dev/null || echo "no rockpool"
} 2>&1 | tee "$OUT/env.txt"

timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -p no:cacheprovider -p no:benchmark -q -m gpu \
  tests 2>&1 | tee "$OUT/pytest_gpu.txt"
tests=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT:-200}" python3 -m bench --groups gpu --json "$OUT/bench_gpu.json" \
  2>&1 | tee "$OUT/bench_gpu.txt"
bench=${PIPESTATUS[0]}

echo "tests exit $tests, bench exit $bench" | tee -a "$OUT/env.txt"
exit $(( tests != 0 || bench != 0 ))
