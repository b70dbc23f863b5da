#!/usr/bin/env bash
# The GPU path, proven and timed on one CUDA GPU in one call of at most BUDGET seconds (default 570); each step has
# a time limit (the CUDA tests' and benchmarks' from a first H200 run with room to spare; the toy's and the
# img64-s run's are still estimates: they have not run on a GPU yet):
#   1. the toy preset under torchrun on CUDA, in the background while 2-3 run: its 2,000-sample exact metrics
#      (2 steps) must match the CPU runs' (class accuracy >= 0.95, TV <= 0.2: CPU runs of seeds 0-2 ended between
#      0.047 and 0.149 over sessions, rounding alone moving them; a collapsed student is at 0.3-0.6);
#   2. the test suite's CUDA cases (core tests parametrized over devices, no host syncs in an iteration, CUDA-graphed
#      iterations equal eager ones, an iteration with every speed option equal to one without; 84 s on the H200
#      before the last three were added);
#   3. a 2 kimg float16 run of a random teacher of the EDM2 img64-s architecture from a zip with 4 data workers,
#      killed after its first checkpoint and resumed to the end; generate_images.py from its snapshot;
#   4. bench/exact.py with the toy student (once the toy has finished);
#   5. bench/train_step.py at bench-s64 (ms/iter, img/s, each variant's peak memory, share of the dense FP16 peak):
#      off=all / default / default without the fast pixel norm and fused attention (the CUDA default until session
#      8, which turned them on for the memory they save) / default with CUDA graphs, alternating in one process
#      (ratios not moved by drift);
#      bench/sample.py (student 1/2/4 steps vs 63-NFE Heun).
# Second calls (each its own): `bash bench/gpu_check.sh compile` times the compiled step alternating with the eager
# one (its compilation took over 4.5 minutes on the H200), then the compiled sampler; `bash bench/gpu_check.sh
# options` times the default against each of the fast pixel norm, fused attention, masked clip and folded scales off
# (all on on CUDA, none timed there yet), and bf16.
# Usage: bash bench/gpu_check.sh [compile|options]    (WORK=DIR keeps the artifacts there, default a temporary folder)
# The last line is "GPU check: PASS" or "GPU check: FAIL (<what failed>)".
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
BUDGET=${BUDGET:-570}
FAILED=()

record() {                  # record NAME RC START: print the step's outcome, remember a failure
    if [ "$2" -eq 0 ]; then echo "--- $1: ok ($((SECONDS - $3)) s)"; else echo "--- $1: FAILED, exit $2 ($((SECONDS - $3)) s)"; FAILED+=("$1"); fi
}

step() {                    # step NAME SECONDS COMMAND...: run COMMAND (a function too) for at most SECONDS
    local name=$1 limit=$2 start=$SECONDS; shift 2
    echo; echo "=== $name (limit $limit s, $((BUDGET - SECONDS)) s of the budget left)"
    if [ "$limit" -lt 20 ]; then echo "--- $name: skipped, the budget is spent"; FAILED+=("$name (no time)"); return; fi
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@"
    record "$name" $? $start
}

left() {                    # left CAP: seconds of the budget left, at most CAP
    local remaining=$((BUDGET - SECONDS))
    echo $((remaining < $1 ? remaining : $1))
}

toy_on_cuda() {
    torchrun --standalone --nproc_per_node=1 train_ncvsd.py --preset=toy --outdir="$WORK/toy" --device=cuda > "$WORK/toy.log" 2>&1
    local rc=$?
    grep -E '^(Training|Exact metrics|kimg|torch.compile)' "$WORK/toy.log" | tail -9
    [ $rc -eq 0 ] || { tail -20 "$WORK/toy.log"; return 1; }
    python - "$WORK/toy/stats.jsonl" <<'EOF'
import json, sys
final = json.loads(open(sys.argv[1]).readlines()[-1])
accuracy, tv = final['Final-0.100/2-step/class_accuracy']['mean'], final['Final-0.100/2-step/tv']['mean']
print(f'toy on CUDA, 2 steps, 2,000 samples: class accuracy {accuracy:.3f} (>= 0.95), TV {tv:.3f} (<= 0.2)')
sys.exit(0 if accuracy >= 0.95 and tv <= 0.2 else 1)
EOF
}

killed_and_resumed() {
    python bench/gpu_assets.py --preset=bench-s64 --outdir="$WORK/assets" --images=512 > "$WORK/assets.log" 2>&1 || { tail "$WORK/assets.log"; return 1; }
    local args=(--preset=bench-s64 "--net=$WORK/assets/teacher.pkl" "--data=$WORK/assets/data.zip" "--outdir=$WORK/s64" --workers=4 --batch-gpu=32)
    setsid torchrun --standalone --nproc_per_node=1 train_ncvsd.py "${args[@]}" > "$WORK/s64-first.log" 2>&1 &
    local pid=$!
    while kill -0 $pid 2>/dev/null && [ ! -f "$WORK/s64/training-state-0000001.pt" ]; do sleep 1; done
    kill -TERM -- -$pid 2>/dev/null; wait $pid 2>/dev/null
    [ -f "$WORK/s64/training-state-0000001.pt" ] || { echo "no checkpoint before the kill"; tail -20 "$WORK/s64-first.log"; return 1; }
    echo "killed after $(ls "$WORK/s64" | grep training-state | tr '\n' ' ')"
    torchrun --standalone --nproc_per_node=1 train_ncvsd.py "${args[@]}" > "$WORK/s64-resumed.log" 2>&1 || { tail -20 "$WORK/s64-resumed.log"; return 1; }
    grep -E '^(Loading|Training|kimg)' "$WORK/s64-resumed.log"
    grep -q 'training-state-0000001.pt' "$WORK/s64-resumed.log" && [ -f "$WORK/s64/training-state-0000002.pt" ] && ls "$WORK/s64"/network-snapshot-0000002-0.100.pkl
}

export -f toy_on_cuda killed_and_resumed
export WORK
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || { echo "GPU check: FAIL (CUDA not available)"; exit 1; }
python -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
echo "artifacts in $WORK; budget $BUDGET s"

S64=(--preset=bench-s64 --batch=64)
if [ "${1:-}" = compile ]; then
    step "bench/train_step.py compiled" "$(left 540)" python bench/train_step.py "${S64[@]}" --iters=4 --warmup=1 \
        --variant=default --variant=compile=True
    step "bench/sample.py compiled" "$(left 150)" python bench/sample.py "${S64[@]}" --repeats=3 --compile=True
elif [ "${1:-}" = options ]; then
    step "bench/train_step.py options" "$(left 300)" python bench/train_step.py "${S64[@]}" --iters=4 --warmup=1 --variant=default \
        --variant=off=fast_pixel_norm --variant=off=fused_attention --variant=off=masked_clip \
        --variant=off=folded_scales --variant=precision=bf16
else
    # The toy is a small network bound by kernel launches: it runs beside the correctness steps (not timed).
    TOY_START=$SECONDS
    timeout --kill-after=10 240 bash -c toy_on_cuda > "$WORK/toy-step.out" 2>&1 &
    TOY_PID=$!
    step "CUDA tests" 180 python -m pytest -q tests -k cuda -p no:cacheprovider
    step "img64-s fp16 run, killed and resumed" 120 killed_and_resumed
    step "generate_images.py" 40 python generate_images.py --net="$WORK/s64/network-snapshot-0000002-0.100.pkl" --ts=10,22,39 \
        --outdir="$WORK/generated" --seeds=0-15 --grid="$WORK/generated.png"
    echo; echo "=== toy on CUDA (limit 240 s from the start, in the background)"
    wait $TOY_PID
    TOY_RC=$?
    cat "$WORK/toy-step.out"
    record "toy on CUDA" $TOY_RC $TOY_START
    step "bench/exact.py on CUDA" 35 python bench/exact.py --student="$WORK/toy/network-snapshot-0000016-0.100.pkl" --n=500 --pnp-images=1 --chains=50 --device=cuda
    step "bench/train_step.py variants" "$(left 130)" python bench/train_step.py "${S64[@]}" --iters=4 --warmup=1 --variant=off=all \
        --variant=default --variant=off=fast_pixel_norm,fused_attention --variant=cuda_graphs=True
    step "bench/sample.py" "$(left 60)" python bench/sample.py "${S64[@]}" --repeats=3
fi

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "GPU check: PASS"
else
    echo "GPU check: FAIL ($(IFS=';'; echo "${FAILED[*]}"))"
    exit 1
fi
