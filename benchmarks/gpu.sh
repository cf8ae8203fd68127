#!/usr/bin/env bash
# The GPU latency tables of docs/performance.md, in one call of a lent GPU machine (its image has torch, timm,
# rich, click and networkx; spot-compile runs from the checkout). Steps go in order of priority, each under its own
# time limit, and the results are packed after every step, so a step that fails or runs long costs only itself.
#   OUT=/some/dir bash benchmarks/gpu.sh      # writes $OUT/gpu.log and $OUT/results.tgz
set -u
OUT=${OUT:-/tmp/gpu_out}
RES=/tmp/gpu_results
mkdir -p "$OUT" "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COLUMNS=200
LOG=$OUT/gpu.log
pack() { tar -czf "$OUT/results.tgz" -C "$RES" . ; }
step() {  # step SECONDS ARGS...: one latency.py run
    local limit=$1; shift
    echo "=== $(date +%T) latency.py $* (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" python3 benchmarks/latency.py --device cuda --out-dir "$RES" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $(date +%T) exit ${PIPESTATUS[0]}" | tee -a "$LOG"
    pack
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
    python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
    nproc
} 2>&1 | tee -a "$LOG"
# The GPU target: DeiT-S, batch 64, budget 0.6; batch 1 is where CUDA graphs matter.
step 240 --model deit_small --budgets 1.0,0.6,0.5 --batches 1,64 --modes eager,compiled,cudagraphs --repeats 30
# The shipped model is tiny (0.18 GFLOPs/image): launch-bound at small batches, so a large batch too.
step 180 --model shipped --policy spot --budgets 1.0,0.6 --batches 1,64,1024 --modes eager,compiled,cudagraphs --repeats 30
# The rest of the grid, as far as one lease allows.
step 100 --model deit_small --budgets 0.8 --batches 8,64 --modes eager,compiled,cudagraphs --repeats 30 --tag extra
echo "=== $(date +%T) done" | tee -a "$LOG"
