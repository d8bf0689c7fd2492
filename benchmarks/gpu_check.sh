#!/usr/bin/env bash
# The checks a session lent a CUDA GPU runs (CI has none), in order of value, each under its own time limit:
#   cuda    tests/test_cuda.py: the public API on the GPU against the float64 CPU references and torch.optim
#   bench   benchmarks/gpu_attention.py: FAVOR+ and separable attention against SDPA on the GPU
#   suite   the whole test suite on that machine (where `--device auto` trains on the GPU)
#   verify  the full `theorylab verify` on that machine (only results.json comes back)
# Run from the repository root with a Python that has torch (CUDA), pytest, pytest-xdist and hypothesis:
#     bash benchmarks/gpu_check.sh [STEP ...]        (default: all four; logs and JSON go to $OUT or ./gpu-check)
set -u
out=${OUT:-gpu-check}
mkdir -p "$out"
steps=${*:-cuda bench suite verify}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# the console script `theorylab` for the CLI tests; without it they fail, the rest still runs
$py -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
  || echo "editable install failed: see install.log"
{ nvidia-smi -L; $py -c "import sys, torch; print(sys.version); print(torch.__version__, torch.cuda.get_device_name())"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
for step in $steps; do
  echo "== $step"
  case $step in
    cuda) timeout 240 $py -m pytest tests/test_cuda.py -q -p no:cacheprovider -n 4 2>&1 | tee "$out/cuda_tests.log" \
            | tail -15 ;;
    bench) timeout 200 $py benchmarks/gpu_attention.py --json "$out/gpu_attention.json" 2>&1 \
             | tee "$out/gpu_attention.log" | tail -40 ;;
    suite) timeout 200 $py -m pytest -q -p no:cacheprovider -n 12 --ignore tests/test_cuda.py 2>&1 \
             | tee "$out/suite.log" | tail -25 ;;
    verify) report=$(mktemp -d)
            timeout 180 $py -m theorylab verify --out "$report" >"$out/verify.log" 2>&1; echo "exit $?"
            tail -25 "$out/verify.log"; cp "$report/results.json" "$out/" 2>/dev/null ;;
    *) echo "unknown step $step (cuda, bench, suite, verify)"; exit 2 ;;
  esac
done
