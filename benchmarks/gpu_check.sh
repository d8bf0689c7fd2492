#!/usr/bin/env bash
# The checks a session lent a CUDA GPU runs (CI has none), in order of value, each under its own time limit:
#   cuda    tests/test_cuda.py: the public API on the GPU against the float64 CPU references and torch.optim
#   bench   benchmarks/gpu_attention.py: FAVOR+ and separable attention against SDPA on the GPU
#   optim   benchmarks/gpu_optim.py: our AdamW (chain, fused, torch.compile; NaN check on and off) against torch's;
#           with each step's host time, kernel launches and kernel time
#   suite   the whole test suite on that machine (where `--device auto` trains on the GPU)
#   verify  the full `theorylab verify` on that machine (only results.json comes back)
#   ddp     torchrun with 1 and 2 processes per machine, `--device auto` and `cuda` (more processes than GPUs)
#   revisions (not by default) benchmarks/attention_revisions.py: causal FAVOR+ and separable attention of other
#           versions against the working tree's, in one process. The GPU machine may lack the git history: unpack
#           each version first (git archive REV src/theorylab | tar -x -C DIR) and name it in
#           REVISION_PACKAGES="LABEL=DIR/src/theorylab ..." (REVISION_NS: the lengths, default 4096 16384 65536).
# Run from the repository root with a Python that has torch (CUDA), pytest, pytest-xdist and hypothesis:
#     bash benchmarks/gpu_check.sh [STEP ...]        (default: all six; logs and JSON go to $OUT or ./gpu-check)
set -u
out=${OUT:-gpu-check}
mkdir -p "$out"
steps=${*:-cuda bench optim suite verify ddp}
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
    optim) timeout 240 $py benchmarks/gpu_optim.py --compile --profile --json "$out/gpu_optim.json" 2>&1 | tee "$out/gpu_optim.log" ;;
    suite) timeout 200 $py -m pytest -q -p no:cacheprovider -n 12 --ignore tests/test_cuda.py 2>&1 \
             | tee "$out/suite.log" | tail -25 ;;
    verify) report=$(mktemp -d)
            timeout 180 $py -m theorylab verify --out "$report" >"$out/verify.log" 2>&1; echo "exit $?"
            tail -25 "$out/verify.log"; cp "$report/results.json" "$out/" 2>/dev/null ;;
    ddp) tiny="--steps 3 --seq-len 32 --layers 1 --width 16 --heads 2 --batch-size 4 --eval-chars 300"
         gpus=$($py -c "import torch; print(torch.cuda.device_count())")
         for run in "$gpus auto" "$((gpus + 1)) auto" "$((gpus + 1)) cuda"; do
           set -- $run; dir=$(mktemp -d)
           timeout 120 $py -m torch.distributed.run --standalone --nproc_per_node "$1" -m theorylab train charlm \
             $tiny --device "$2" --out "$dir" >"$out/ddp-$1-$2.log" 2>&1
           echo "nproc $1 (GPUs: $gpus), --device $2: exit $? $(grep -ho 'UserWarning.*' "$out/ddp-$1-$2.log" \
             | head -1) $(grep -ho 'error: .*' "$out/ddp-$1-$2.log" | head -1)"
           $py -c "import json,sys; m=json.load(open(sys.argv[1])); print('  ', m['world_size'], m['backend'], \
             m['device'], round(m['final_bpc'], 3))" "$dir/metrics.json" 2>/dev/null
         done ;;
    revisions) packages=()
               for p in ${REVISION_PACKAGES:-}; do packages+=(--package "$p"); done
               for kind in favor separable; do
                 timeout 150 $py benchmarks/attention_revisions.py "${packages[@]}" --worktree --kind $kind \
                   --ns ${REVISION_NS:-4096 16384 65536} --json "$out/revisions-$kind.json" 2>&1 | tee "$out/revisions-$kind.log" | tail -8
               done ;;
    *) echo "unknown step $step (cuda, bench, optim, suite, verify, ddp, revisions)"; exit 2 ;;
  esac
done
