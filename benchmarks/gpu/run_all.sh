#!/bin/bash
# One call on a lent GPU machine (the workplace's device tool; see benchmarks/README.md, "On a GPU"):
# the default test suite on the GPU backend, then the benchmarks whose goals are ratios, --quick.
# The machine has JAX, optax, chex, matplotlib, joblib, rich and pytest but no pydantic or matfree:
# carry them as wheels in .whl/ (pip download --only-binary=:all: --python-version 3.12 ... -d .whl).
# Usage there: TEST_BUDGET=330 bash benchmarks/gpu/run_all.sh   (results under $OUT)
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gradlab-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# -v (not -q) so that each test's outcome is on its own line even if the budget cuts the run short
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "${TEST_BUDGET:-330}" python3 -m pytest -v -n 8 \
  -p no:cacheprovider -p no:benchmark -o addopts="" -m "not slow" tests/ > "$OUT/tests.log" 2>&1
echo "pytest rc=$?"
grep -E " (FAILED|ERROR) " "$OUT/tests.log" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort | head -40
grep -cE " PASSED " "$OUT/tests.log"
for b in zo_batching descent_overhead hvp_cost trace_estimators; do
  timeout 150 python3 "benchmarks/$b.py" --quick > "$OUT/$b.jsonl" 2> "$OUT/$b.err"
  echo "$b rc=$?"; tail -c 600 "$OUT/$b.jsonl"; echo
done
