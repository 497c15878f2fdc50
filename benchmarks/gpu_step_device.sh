#!/usr/bin/env bash
# Issue 7's GPU measurement in one command, for a lent H100 (the `device` tool's `run`):
#
#     bash benchmarks/gpu_step_device.sh                  # every part, compile scope "blocks"
#     BUDGET=200 bash benchmarks/gpu_step_device.sh --parts swin_v2   # a shorter second try
#     # two runs in one call (a lent machine goes back 30 s after a call): TAG names the files
#     TAG=d BUDGET=150 bash benchmarks/gpu_step_device.sh --parts pretrain_step --no-compile; \
#     TAG=enc BUDGET=300 bash benchmarks/gpu_step_device.sh --parts vit,fusion,swin_v2
#
# It needs only what the device image holds (torch, timm, safetensors, pyyaml, tqdm): skysense
# runs from src/ without being installed, and nothing it imports needs rasterio. What it writes
# goes to $OUT (the folder the tool brings back), or ./gpu_step_out elsewhere:
#   environment.txt  the GPU, its driver and clocks, the library versions
#   gpu_step.json    the report, rewritten after every row (a run cut short keeps its rows)
#   gpu_step.log     what the benchmark printed, the table at its end
#   gpu_step.cache   torch.compile's caches (benchmarks/compile_cache.py), rewritten after
#                    every compiled row
# (gpu_step-$TAG.json, .log and .cache when TAG is set.) When .compile-cache/ (ignored by git)
# holds a .cache file of that name, brought back by an earlier call and named in the call's
# `carry`, the run starts from it and compiles only what changed.
# BUDGET (seconds, default 360) is when gpu_step.py stops starting measurements; give the call a
# timeout about 3 minutes longer, since a compilation or (d) may still be running then.
# Extra arguments go to benchmarks/gpu_step.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_step_out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Grown segments instead of new fixed-size ones: less fragmentation near the memory limit, where
# (d) runs at the paper's batch (set PYTORCH_CUDA_ALLOC_CONF to override).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
{
    date -u
    echo "PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    python3 -c "import sys, torch, timm; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'timm', timm.__version__)"
} 2>&1 | tee "$out/environment.txt"
name=gpu_step${TAG:+-$TAG}
if [ -f ".compile-cache/$name.cache" ] && [ ! -f "$out/$name.cache" ]; then
    cp ".compile-cache/$name.cache" "$out/$name.cache"
fi
python3 benchmarks/gpu_step.py --json "$out/$name.json" --budget "${BUDGET:-360}" --profile \
    --compile-cache "$out/$name.cache" "$@" 2>&1 | tee "$out/$name.log"
