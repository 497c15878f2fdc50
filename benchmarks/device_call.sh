#!/usr/bin/env bash
# Issue 7's measurements for one lent H100 call (the `device` tool's `run`, timeout_s=600):
#
#     bash benchmarks/device_call.sh 2>&1 | tee $OUT/device_call.txt
#     SMOKE=1 OUT=/tmp/out bash benchmarks/device_call.sh      # the same steps on the CPU, tiny shapes
#
# The plan after the second H100 run (benchmarks/RESULTS.md, 2026-11-28; that call ran this
# script as of 86ac9b1). Steps, each under `timeout` and cut to what is left of DEADLINE
# (seconds, default 580), so that a slow step costs the later ones their time but never the call
# its files:
#   1. (b) ViT-L/4 and (c) the fusion, ours and timm's, eager and compiled block-wise with CUDA
#      graphs (ENCODER_MODE, default reduce-overhead): on 2026-11-28 11.7 ms of our ViT-L step
#      (5.0 of timm's) ran no kernel, and CUDA graphs took SwinV2-H's from 31.6 ms to 3.6 ms;
#   2. (d) the full pretraining step at the paper's batch 3 (STEP_BATCH), down the checkpointing
#      ladder (each retry on a model built anew; from selective where 78.3 GiB or less is there),
#      then compiled block-wise at the setting that fitted (the next ones while the compiled step
#      does not fit), 30 Sinkhorn-Knopp rounds without read-backs; on a card over 80 GB with the
#      allocator capped at what the H100 could reserve;
#   0. first (unless ATTENTION=0): benchmarks/attention_backends.py on (b)'s and (c)'s calls, and
#      our attention in step 1 restricted to the backend (SDPA's, or the short-sequence Triton
#      kernel "short" where its values check out) that beat SDPA's default by 1.1x or more over
#      the part's calls; "short" for (d)'s fusion too if our compiled fusion with it then beat
#      timm's in step 1;
#   0b. then (unless BIAS=0, at most 75 s): benchmarks/bias_kernels.py, our MLPs, attention layers
#      and a ViT-L block with and without the kernels that sum their bias gradients
#      (skysense.models.gelu_bias, qkv_gradient, residual_norm) at (a)'s, (b)'s and (c)'s shapes,
#      values checked; steps 1 and 2 run our layers with each kernel in the parts where it won by
#      1.05x or more (a whole block: 1.02x; (d) also only if our compiled rows with them ran in
#      step 1); BIAS_KERNELS="--our-mlp-kernel PARTS --our-qkv-kernel PARTS --our-norm-kernel PARTS"
#      chooses instead;
#   3. last (unless ATTENTION=0), with what (d) leaves (at least SWIN_RESERVE seconds, default 90):
#      benchmarks/swin_attention.py, SwinV2-H's window attention layers through SDPA and through
#      the short kernel, compiled, with the step's ratio (a measurement; (a) itself is not run).
# The tool brings back at most 8 files: every finished step's JSON and log go into
# $OUT/done.tgz (rewritten after each step); the step in flight writes its own files into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device_out}
mkdir -p "$out"
export OUT=$out PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline=${DEADLINE:-580}
finished=$(mktemp -d)
if [ -n "${SMOKE:-}" ]; then
    attention_args=(--device cpu --small --warmup 0 --repeats 1)
    step_args=(--device cpu --small --warmup 0 --repeats 1)
    batch=${STEP_BATCH:-2}
else
    attention_args=()
    step_args=()
    batch=${STEP_BATCH:-3}
fi

left() { echo $((deadline - SECONDS)); }

bundle() {  # bundle LABEL: the finished step's files into done.tgz; compile caches are not kept
    [ -f "$out/environment.txt" ] && mv "$out/environment.txt" "$finished/environment-$1.txt"
    find "$out" -maxdepth 1 -type f \( -name '*.json' -o -name '*.log' \) -exec mv -t "$finished" {} +
    rm -f "$out"/*.cache
    tar czf "$out/.done.tgz" -C "$finished" . && mv "$out/.done.tgz" "$out/done.tgz"
}

step() {  # step LABEL SECONDS COMMAND...: run it for at most SECONDS, or what is left if less
    local label=$1 seconds=$2 remaining
    shift 2
    remaining=$(left)
    ((seconds > remaining)) && seconds=$remaining
    if ((seconds < 30)); then
        echo "device_call: no time left for: $*" | tee -a "$out/skipped.log"
    else
        echo "device_call: at ${SECONDS} s, up to ${seconds} s for: $*"
        timeout -k 10 "$seconds" "$@"
        echo "device_call: exit $? at ${SECONDS} s"
    fi
    bundle "$label"
}

ours_args=()
step_ours_args=()
if [ "${ATTENTION:-1}" != 0 ]; then
    # The fusion's calls first: its choice also goes to (d).
    step attention 75 bash -c "python3 benchmarks/attention_backends.py ${attention_args[*]} --parts fusion,vit \
        --budget 35 --json $out/attention.json 2>&1 | tee $out/attention.log"
    ours=$(python3 benchmarks/attention_backends.py --our-sdpa-from "$finished/attention.json" 2>/dev/null)
    echo "device_call: our attention: ${ours:-none, SDPA picks}" | tee "$out/choice.log"
    read -r -a ours_args <<<"$ours"
fi
bias_args=()
if [ "${BIAS:-1}" != 0 ]; then
    # On the CPU (SMOKE) the kernels run only under Triton's interpreter.
    step bias 75 env ${SMOKE:+TRITON_INTERPRET=1} bash -c "python3 benchmarks/bias_kernels.py \
        ${attention_args[*]} --json $out/bias_kernels.json 2>&1 | tee $out/bias_kernels.log"
    bias=$(python3 benchmarks/bias_kernels.py --choice-from "$finished/bias_kernels.json" 2>/dev/null)
    # BIAS_KERNELS overrides the choice (a second call, or the smoke run's paths)
    bias=${BIAS_KERNELS:-$bias}
    echo "device_call: our bias-gradient kernels: ${bias:-none}" | tee -a "$out/choice.log"
    read -r -a bias_args <<<"$bias"
fi
step enc 150 env TAG=enc BUDGET=90 bash benchmarks/gpu_step_device.sh --parts vit,fusion \
    --compile-mode "${ENCODER_MODE:-reduce-overhead}" "${ours_args[@]}" "${bias_args[@]}" "${step_args[@]}"
# "short" for (d)'s fusion only if it was chosen and our compiled fusion then beat timm's in step 1:
# a kernel that fails or loses inside the compiled model must not cost (d) its compiled row.
if [[ " ${ours_args[*]} " == *" fusion=short "* ]] && python3 - "$finished/gpu_step-enc.json" <<'EOF'
import json, sys
rows = {(r["part"], r["implementation"], r["mode"]): r for r in json.load(open(sys.argv[1]))["results"]}
ours, timm = rows.get(("fusion", "skysense", "compiled")), rows.get(("fusion", "timm", "compiled"))
sys.exit(0 if ours and timm and not ours["error"] and not timm["error"] and ours["step_ms"] < timm["step_ms"] else 1)
EOF
then
    step_ours_args=(--our-sdpa fusion=short)
fi
# A bias-gradient kernel for (d) only if it was chosen for (d) and our compiled rows ran in step 1 with
# the kernels chosen there.
if [ ${#bias_args[@]} -gt 0 ] && python3 - "$finished/gpu_step-enc.json" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["results"] if r["implementation"] == "skysense" and r["mode"] != "eager"]
sys.exit(0 if rows and not any(r["error"] for r in rows) else 1)
EOF
then
    for ((i = 0; i + 1 < ${#bias_args[@]}; i += 2)); do
        [[ ",${bias_args[i + 1]}," == *,pretrain_step,* ]] && step_ours_args+=("${bias_args[i]}" pretrain_step)
    done
fi
echo "device_call: (d) attention and bias kernels: ${step_ours_args[*]:-SDPA picks, none}" | tee "$out/choice-d.log"
# Issue 7 asks whether the paper's batch fits in 80 GB: on a larger card (an H200's 141 GB) (d)'s
# allocator is capped at what the H100 of 2026-11-28 could reserve (gpu_step.H100_ALLOCATOR_GIB),
# so its ladder stops where that H100's would (MEMORY_CAP_GIB=none: the whole card).
cap_args=()
card_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n1 | tr -d ' ')
if [ -z "${SMOKE:-}" ] && [ "${MEMORY_CAP_GIB:-}" != none ] && [ "${card_mib:-0}" -gt 82000 ] 2>/dev/null; then
    cap_args=(--memory-cap-gib "${MEMORY_CAP_GIB:-78.3}")
fi
# With 78.3 GiB or less, (d) at batch 3 needs checkpointing (estimated 90.7 GiB without, 70.5
# selective: benchmarks/step_memory.py): the ladder starts at selective, saving a failed step and
# a model built anew (STEP_CHECKPOINTING overrides).
start=off
if [ -z "${SMOKE:-}" ] && { [ ${#cap_args[@]} -gt 0 ] || [ "${card_mib:-0}" -le 82000 ] 2>/dev/null; }; then
    start=selective
fi
start=${STEP_CHECKPOINTING:-$start}
echo "device_call: (d) memory: ${card_mib:-?} MiB card, ${cap_args[*]:-no cap}, checkpointing from $start" \
    | tee -a "$out/choice-d.log"
# (d): the eager ladder takes about a minute; then the compiled row compiles 27 block graphs
# (counted on the CPU at huge's structure with narrow widths, selective checkpointing or none:
# tests/test_gpu_step_benchmark.py::test_the_huge_pretraining_step_compiles_into_few_graphs):
# it gets everything that is left but SWIN_RESERVE seconds for step 3.
reserve=0
[ "${ATTENTION:-1}" != 0 ] && reserve=${SWIN_RESERVE:-90}
d_seconds=$(($(left) - reserve))
step d "$d_seconds" env TAG=d BUDGET=$((d_seconds - 60)) bash benchmarks/gpu_step_device.sh --parts pretrain_step \
    --step-batch "$batch" --warmup 2 --repeats 4 --sinkhorn-rounds 30 --step-checkpointing "$start" \
    "${step_ours_args[@]}" "${cap_args[@]}" "${step_args[@]}"
if [ "${ATTENTION:-1}" != 0 ]; then
    # SwinV2-H's window attention layers, SDPA against the short kernel (bias, shift mask and
    # 44-wide heads in the kernel), compiled, in one process: a measurement only, (a) is not run.
    step swin_attention 120 bash -c "python3 benchmarks/swin_attention.py ${attention_args[*]} \
        --json $out/swin_attention.json 2>&1 | tee $out/swin_attention.log"
fi
echo "device_call: done at ${SECONDS} s"
