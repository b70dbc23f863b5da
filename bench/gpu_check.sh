#!/usr/bin/env bash
# The GPU path, proven on one CUDA GPU within 10 minutes (each step has a time limit; never run on a GPU yet):
#   1. the test suite's CUDA cases (core tests parametrized over devices);
#   2. the toy preset under torchrun on CUDA to completion: its 2,000-sample exact metrics (2 steps) must
#      match the CPU run's (class accuracy >= 0.95, TV <= 0.15);
#   3. a 2 kimg float16 run of a random teacher of the EDM2 img64-s architecture from a zip with 4 data
#      workers, killed after its first checkpoint and resumed to the end;
#   4. bench/exact.py with the toy student, generate_images.py from the img64-s run's snapshot;
#   5. bench/train_step.py and bench/sample.py at bench-s64 (ms/iter, img/s, peak memory, share of the dense FP16
#      peak): the default alone (its peak memory), then off=all / default / channels-last / bf16 alternating in one
#      process (ratios not moved by drift).
# Usage: bash bench/gpu_check.sh            (WORK=DIR keeps the artifacts there; default: a temporary folder)
#        bash bench/gpu_check.sh compile    (a second call: the compiled step and sampler, minutes of compilation)
# The last line is "GPU check: PASS" or "GPU check: FAIL (<what failed>)".
set -u
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d)}
FAILED=()

step() {                    # step NAME SECONDS COMMAND...: run COMMAND (a function too) for at most SECONDS
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (limit $limit s)"
    local start=$SECONDS
    if timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@"; then echo "--- $name: ok ($((SECONDS - start)) s)"; else echo "--- $name: FAILED ($((SECONDS - start)) s)"; FAILED+=("$name"); fi
}

toy_on_cuda() {
    torchrun --standalone --nproc_per_node=1 train_ncvsd.py --preset=toy --outdir="$WORK/toy" --device=cuda > "$WORK/toy.log" 2>&1
    local rc=$?
    grep -E '^(Training|Exact metrics|kimg)' "$WORK/toy.log" | tail -9
    [ $rc -eq 0 ] || { tail -20 "$WORK/toy.log"; return 1; }
    python - "$WORK/toy/stats.jsonl" <<'EOF'
import json, sys
final = json.loads(open(sys.argv[1]).readlines()[-1])
accuracy, tv = final['Final-0.100/2-step/class_accuracy']['mean'], final['Final-0.100/2-step/tv']['mean']
print(f'toy on CUDA, 2 steps, 2,000 samples: class accuracy {accuracy:.3f} (>= 0.95), TV {tv:.3f} (<= 0.15)')
sys.exit(0 if accuracy >= 0.95 and tv <= 0.15 else 1)
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
echo "artifacts in $WORK"

S64=(--preset=bench-s64 --batch=64)
if [ "${1:-}" = compile ]; then
    step "bench/train_step.py compiled" 420 python bench/train_step.py "${S64[@]}" --iters=6 --warmup=2 --compile=True
    step "bench/sample.py compiled" 150 python bench/sample.py "${S64[@]}" --repeats=3 --compile=True
else
    step "CUDA tests" 90 python -m pytest -q tests -k cuda -p no:cacheprovider
    step "toy on CUDA" 170 toy_on_cuda
    step "img64-s fp16 run, killed and resumed" 100 killed_and_resumed
    step "bench/exact.py on CUDA" 35 python bench/exact.py --student="$WORK/toy/network-snapshot-0000016-0.100.pkl" --n=500 --pnp-images=1 --chains=50 --device=cuda
    step "generate_images.py" 30 python generate_images.py --net="$WORK/s64/network-snapshot-0000002-0.100.pkl" --ts=10,22,39 \
        --outdir="$WORK/generated" --seeds=0-15 --grid="$WORK/generated.png"
    step "bench/train_step.py" 35 python bench/train_step.py "${S64[@]}" --iters=6 --warmup=2
    step "bench/train_step.py variants" 70 python bench/train_step.py "${S64[@]}" --iters=6 --warmup=2 --variant=off=all \
        --variant=default --variant=on=channels_last --variant=precision=bf16
    step "bench/sample.py" 30 python bench/sample.py "${S64[@]}" --repeats=3
fi

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "GPU check: PASS"
else
    echo "GPU check: FAIL ($(IFS=';'; echo "${FAILED[*]}"))"
    exit 1
fi
