#!/usr/bin/env bash
# Issue 7's measurements for one lent H100 call (the `device` tool's `run`, timeout_s=600):
#
#     bash benchmarks/device_call.sh
#     SMOKE=1 OUT=/tmp/out bash benchmarks/device_call.sh      # the same steps on the CPU, tiny shapes
#
# Steps, each under `timeout` and cut to what is left of DEADLINE (seconds, default 580), so
# that a slow step costs the later ones their time but never the call its files:
#   1. benchmarks/attention_backends.py: every attention call of (a)-(d) with every backend;
#   2. (b) ViT-L/4 and (c) the fusion, ours and timm's, eager and compiled; our attention
#      restricted to the backend that beat SDPA's default by 1.1x or more over the part's calls
#      (attention_backends.py --our-sdpa-from), if one did;
#   3. (d) the full pretraining step at the paper's batch 3, eager, down the checkpointing ladder
#      (does it fit in 80 GB, and with what), 30 Sinkhorn-Knopp rounds without read-backs;
#   4. (a) SwinV2-H, ours and timm's, eager and compiled block-wise with CUDA graphs
#      (COMPILE_MODE, default reduce-overhead), with step 1's choice for our SwinV2 if any; if a
#      compiled row failed and over 200 s are left, again in torch.compile's default mode.
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
    batch=2
else
    attention_args=()
    step_args=()
    batch=3
fi

left() { echo $((deadline - SECONDS)); }

bundle() {  # bundle LABEL: the finished step's files into done.tgz; compile caches are not kept
    [ -f "$out/environment.txt" ] && mv "$out/environment.txt" "$finished/environment-$1.txt"
    find "$out" -maxdepth 1 -type f \( -name '*.json' -o -name '*.log' -o -name 'environment*.txt' \) \
        -exec mv -t "$finished" {} +
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

step attention 75 bash -c "python3 benchmarks/attention_backends.py ${attention_args[*]} --budget 35 \
    --json $out/attention.json 2>&1 | tee $out/attention.log"
ours=$(python3 benchmarks/attention_backends.py --our-sdpa-from "$finished/attention.json" 2>/dev/null)
echo "device_call: our attention: ${ours:-none, SDPA picks}" | tee "$out/choice.log"
read -r -a ours_args <<<"$ours"
step enc 150 env TAG=enc BUDGET=80 bash benchmarks/gpu_step_device.sh --parts vit,fusion "${ours_args[@]}" "${step_args[@]}"
step d 100 env TAG=d BUDGET=50 bash benchmarks/gpu_step_device.sh --parts pretrain_step --step-batch "$batch" \
    --no-compile --warmup 2 --repeats 4 --sinkhorn-rounds 30 "${step_args[@]}"
# The swin run compiles ours, then timm's (run 1: 159 s and 110 s): timm's compiled row starts
# only if about 130 s are left.
swin_budget=$(($(left) - 130))
((swin_budget < 30)) && swin_budget=30
step swin 600 env TAG=swin BUDGET="$swin_budget" bash benchmarks/gpu_step_device.sh --parts swin_v2 \
    --compile-mode "${COMPILE_MODE:-reduce-overhead}" "${ours_args[@]}" "${step_args[@]}"
# CUDA graphs untried until now: if a compiled row failed with them and over 200 s are left,
# (a) again in torch.compile's default mode, so that it gets compiled numbers all the same.
if [ "${COMPILE_MODE:-reduce-overhead}" != default ] && (($(left) > 200)) && python3 - "$finished/gpu_step-swin.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
failed = [r for r in rows if r["mode"] == "compiled" and r["error"] and not r["error"].startswith("skipped")]
sys.exit(0 if failed or not any(r["mode"] == "compiled" for r in rows) else 1)
EOF
then
    step swin-default 600 env TAG=swin-default BUDGET=$(($(left) - 130)) bash benchmarks/gpu_step_device.sh \
        --parts swin_v2 "${ours_args[@]}" "${step_args[@]}"
fi
echo "device_call: done at ${SECONDS} s"
