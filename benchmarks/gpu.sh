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
pack() { tar -czf "$OUT/results.tgz" -C "$RES" . ; }  # partial.json files too: a step cut short keeps its rows
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
# Measured on the 2026-11-26 lease (docs/performance.md): DeiT-S, budgets 1.0 and 0.6, batch 64. Still missing, in
# order of priority; each step is one small latency.py run (about 80 s per budget and batch for DeiT-S, compiles
# included): a run writes its tables only when it ends, and a step cut short leaves only its partial.json rows.
# The shipped model is tiny (0.18 GFLOPs/image): launch-bound at small batches, so a large batch too. Its SPOT graph
# failed to compile here on that lease (fixed since in ops.token_positions).
step 190 --model shipped --policy spot --budgets 1.0,0.6 --batches 64,1024 --modes eager,compiled,cudagraphs --repeats 30
step 220 --model deit_small --budgets 1.0,0.6 --batches 1,8 --modes eager,compiled,cudagraphs --repeats 30 --tag small_batches
step 160 --model deit_small --budgets 0.8,0.5 --batches 64 --modes eager,compiled,cudagraphs --repeats 30 --tag budgets
echo "=== $(date +%T) done" | tee -a "$LOG"
