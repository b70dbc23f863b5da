#!/usr/bin/env bash
# The GPU path, proven and timed on one CUDA GPU in calls of 380, 480 and 300 s; a session's 15 minutes of device time
# (about 30-90 s to start a machine) hold `timing` and `options`, or `timing` and, if it ends early, the first. Every
# step has a time limit, every call a budget:
#
#   bash bench/gpu_check.sh          proves the path. Side by side from the start (their timings are not figures):
#       - the suite's CUDA cases (core tests over devices, no host syncs in an iteration, CUDA-graphed iterations
#         equal eager ones, an iteration with every speed option equal to one without);
#       - the toy preset under torchrun on CUDA to completion: its 2,000-sample exact metrics (2 steps) must match
#         the CPU runs' (class accuracy >= 0.95, TV <= 0.2: CPU runs of seeds 0-2 ended between 0.047 and 0.149 over
#         sessions, their initial network unseeded until session 27; a collapsed student is at 0.3-0.6);
#       - a 2 kimg float16 run (batch 64 in two rounds of 32) of a random teacher of the EDM2 img64-s architecture from
#         a zip with 4 data workers, sent SIGTERM after its first checkpoint (it writes one where it stands and
#         stops) and resumed to the end, then generate_images.py from its snapshot.
#     Then, alone on the GPU: bench/exact.py with the toy student and bench/sample.py (student 1/2/4 steps vs 63-NFE
#     Heun, share of the FP16 peak). The step is timed by the other two calls.
#   bash bench/gpu_check.sh timing   eager against compiled: one compiled iteration at bench-s64 alone, cold (it fills
#       inductor's cache in the repository's ignored .cache/; it took over 270 s beside other jobs, so nothing runs
#       beside it), then off=all, the default and compile=True alternating in one process (ms/iter, img/s, each
#       variant's peak memory; then one profiled iteration each: where the time goes; compile=True only where the
#       cold compile finished, else it would spend the step compiling), then the compiled sampler (and one profiled
#       batch of its 1-step student) if time is left.
#   bash bench/gpu_check.sh options  the default against each of the grouped weight normalisation, fast pixel norm,
#       fused attention, masked clip, folded scales, cached constant weights, flat gradients, pooled resampling and qkv
#       blocks off, and bf16; then against CUDA graphs in a process of its own
#       (their recorded graphs keep their memory: beside other variants an H100 could run out).
#
# DEVICE=cpu rehearses the script's own plumbing (time limits, file names, the kill and resume) on a machine without
# a GPU, at bench-a size with a 1 kimg toy whose quality is not checked, the side-by-side steps one after another;
# SLOW multiplies every time limit (default 1 on CUDA, 6 on the CPU). WORK=DIR keeps the artifacts there (default a temporary folder).
# BUDGET=SECONDS replaces the call's budget (timing: what it adds goes to the cold compile).
# CACHE_PACK=DIR packs inductor's cache into DIR after `timing`'s cold compile and at the end (inductor-cache.tgz.part-NN,
# 15 MiB parts, at most 3). Parts put in .cache/inductor-pack/ are unpacked into an empty cache at the start: a fresh
# machine with the same GPU and torch then finds the graphs an earlier machine compiled.
# The last line is "GPU check: PASS" or "GPU check: FAIL (<what failed>)".
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
MODE=${1:-check}
declare -A BUDGETS=([check]=380 [timing]=480 [options]=300)
[ -n "${BUDGETS[$MODE]:-}" ] || { echo "usage: bash bench/gpu_check.sh [timing|options]  (not \"$MODE\")"; exit 2; }
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
CACHE_FROM=${CACHE_FROM:-.cache/inductor-pack} PART=inductor-cache.tgz.part- MAX_PARTS=3
if [ "$DEVICE" = cuda ]; then
    SLOW=${SLOW:-1}
    PRESET=bench-s64 BATCH=64 TOY_ARGS=''
else
    SLOW=${SLOW:-6}
    PRESET=bench-a BATCH=32 TOY_ARGS='--duration=1Ki --snapshot=1Ki --checkpoint=1Ki'
fi
BENCH=(--preset=$PRESET --batch=$BATCH --device=$DEVICE)
BUDGET=${BUDGET:-$((BUDGETS[$MODE] * SLOW))}
FAILED=()
declare -A BACKGROUND_PID BACKGROUND_RC BACKGROUND_START BACKGROUND_END BACKGROUND_LABEL

record() {                  # record NAME RC SECONDS [optional]: print the step's outcome, remember a failure
    if [ "$2" -eq 0 ]; then
        echo "--- $1: ok ($3 s)"
    elif [ -n "${4:-}" ]; then
        echo "--- $1: not finished, exit $2 ($3 s; optional)"
    else
        echo "--- $1: FAILED, exit $2 ($3 s)"; FAILED+=("$1")
    fi
}

limit() {                   # limit CAP: CAP seconds scaled by SLOW, at most what is left of the budget
    local cap=$(($1 * SLOW)) remaining=$((BUDGET - SECONDS))
    echo $((remaining < cap ? remaining : cap))
}

limited() {                 # limited SECONDS COMMAND...: run COMMAND (a function too), killed after SECONDS
    local seconds=$1; shift
    timeout --kill-after=10 "$seconds" bash -c '"$@"' _ "$@"
}

step() {                    # [OPTIONAL=1] step NAME SECONDS COMMAND...: run COMMAND (a function too) for at most SECONDS
    local name=$1 seconds=$2 start=$SECONDS; shift 2
    LAST_RC=skipped
    echo; echo "=== $name (limit $seconds s, $((BUDGET - SECONDS)) s of the budget left)"
    if [ "$seconds" -lt 20 ]; then
        echo "--- $name: skipped, the budget is spent"; [ -n "${OPTIONAL:-}" ] || FAILED+=("$name (no time)"); return
    fi
    limited "$seconds" "$@"
    LAST_RC=$?
    record "$name" "$LAST_RC" $((SECONDS - start)) "${OPTIONAL:-}"
}

background() {              # background KEY NAME SECONDS COMMAND...: start COMMAND beside the others, output to $WORK
    local key=$1 name=$2 seconds=$3; shift 3
    BACKGROUND_START[$key]=$SECONDS; BACKGROUND_LABEL[$key]=$name
    if [ "$DEVICE" = cuda ]; then
        echo "=== $name: started in the background (limit $seconds s)"
        limited "$seconds" "$@" > "$WORK/$key.out" 2>&1 &
        BACKGROUND_PID[$key]=$!
    else                    # A rehearsal's few cores cannot share these jobs: one after another, the same plumbing.
        echo "=== $name: run now (rehearsal; limit $seconds s)"
        limited "$seconds" "$@" > "$WORK/$key.out" 2>&1
        BACKGROUND_RC[$key]=$? BACKGROUND_END[$key]=$SECONDS
    fi
}

collect() {                 # collect KEY: wait for a background step, print its output and outcome
    local rc=${BACKGROUND_RC[$1]:-}
    [ -n "$rc" ] || { wait "${BACKGROUND_PID[$1]}"; rc=$?; }
    echo; echo "=== ${BACKGROUND_LABEL[$1]} (in the background)"
    cat "$WORK/$1.out"
    record "${BACKGROUND_LABEL[$1]}" $rc $((${BACKGROUND_END[$1]:-$SECONDS} - BACKGROUND_START[$1]))
}

unpack_cache() {            # an earlier machine's packed cache (CACHE_FROM), into an empty cache folder
    local parts=("$CACHE_FROM/$PART"*)
    [ -f "${parts[0]}" ] || return 0
    if [ -n "$(ls -A "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null)" ]; then
        echo "inductor cache: not empty, the pack in $CACHE_FROM left alone"; return 0
    fi
    mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
    cat "${parts[@]}" | tar -xz -C "$TORCHINDUCTOR_CACHE_DIR" || { echo "inductor cache: $CACHE_FROM could not be unpacked"; return 0; }
    local made_on
    made_on=$(cat "$TORCHINDUCTOR_CACHE_DIR/made-on.txt" 2>/dev/null || echo 'an unknown machine')
    echo "inductor cache: unpacked from $CACHE_FROM, $(find "$TORCHINDUCTOR_CACHE_DIR" -type f | wc -l) files, made on $made_on"
    [ "$made_on" = "$MACHINE" ] || echo "inductor cache: made on another torch, CUDA or GPU, whose entries this machine's keys will not find"
}

pack_cache() {              # inductor's cache into CACHE_PACK, where it is set and holds compiled graphs
    [ -n "${CACHE_PACK:-}" ] || return 0
    [ -d "$TORCHINDUCTOR_CACHE_DIR/fxgraph" ] || { echo "inductor cache: no compiled graphs, nothing packed"; return 0; }
    echo "$MACHINE" > "$TORCHINDUCTOR_CACHE_DIR/made-on.txt"
    mkdir -p "$CACHE_PACK"; rm -f "$CACHE_PACK/$PART"*
    tar -cz --exclude=./locks -C "$TORCHINDUCTOR_CACHE_DIR" . | split -b 15M -d -a 2 - "$CACHE_PACK/$PART"
    local parts=("$CACHE_PACK/$PART"*)
    if [ ${#parts[@]} -gt $MAX_PARTS ]; then
        echo "inductor cache: $(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1) is over $MAX_PARTS parts of 15 MiB packed; not packed"
        rm -f "$CACHE_PACK/$PART"*
    else
        echo "inductor cache: packed into ${#parts[@]} part(s) in $CACHE_PACK ($(du -ch "${parts[@]}" | tail -1 | cut -f1))"
    fi
}

toy_run() {
    torchrun --standalone --nproc_per_node=1 train_ncvsd.py --preset=toy --outdir="$WORK/toy" --device="$DEVICE" \
        $TOY_ARGS > "$WORK/toy.log" 2>&1
    local rc=$?
    grep -E '^(Training|Exact metrics|kimg|torch.compile)' "$WORK/toy.log" | tail -9
    [ $rc -eq 0 ] || { tail -20 "$WORK/toy.log"; return 1; }
    python - "$WORK/toy/stats.jsonl" "$DEVICE" <<'EOF'
import json, sys
final = json.loads(open(sys.argv[1]).readlines()[-1])
accuracy, tv = final['Final-0.100/2-step/class_accuracy']['mean'], final['Final-0.100/2-step/tv']['mean']
print(f'toy on {sys.argv[2]}, 2 steps, 2,000 samples: class accuracy {accuracy:.3f} (>= 0.95), TV {tv:.3f} (<= 0.2)')
if sys.argv[2] != 'cuda':
    print('rehearsal: a 1 kimg toy is not trained, its quality is not checked')
    sys.exit(0)
sys.exit(0 if accuracy >= 0.95 and tv <= 0.2 else 1)
EOF
}

stopped_and_resumed() {
    python bench/gpu_assets.py --preset="$PRESET" --outdir="$WORK/assets" --images=512 > "$WORK/assets.log" 2>&1 || { tail "$WORK/assets.log"; return 1; }
    local args=(--preset="$PRESET" "--net=$WORK/assets/teacher.pkl" "--data=$WORK/assets/data.zip" "--outdir=$WORK/s64" --workers=4
        --batch-gpu=32 --duration=2Ki --checkpoint=1Ki --snapshot=2Ki --device="$DEVICE")
    setsid torchrun --standalone --nproc_per_node=1 train_ncvsd.py "${args[@]}" > "$WORK/s64-first.log" 2>&1 &
    local pid=$!
    while kill -0 $pid 2>/dev/null && [ ! -f "$WORK/s64/training-state-0000001.pt" ]; do sleep 1; done
    kill -TERM -- -$pid 2>/dev/null; wait $pid 2>/dev/null      # SIGTERM to every process, as a scheduler sends it.
    [ -f "$WORK/s64/training-state-0000001.pt" ] || { echo "no checkpoint before the kill"; tail -20 "$WORK/s64-first.log"; return 1; }
    grep -q '^Stopped by SIGTERM' "$WORK/s64-first.log" || { echo "no checkpoint on SIGTERM"; tail -20 "$WORK/s64-first.log"; return 1; }
    echo "stopped by SIGTERM with $(ls "$WORK/s64" | grep training-state | tr '\n' ' ')"
    torchrun --standalone --nproc_per_node=1 train_ncvsd.py "${args[@]}" > "$WORK/s64-resumed.log" 2>&1 || { tail -20 "$WORK/s64-resumed.log"; return 1; }
    grep -E '^(Loading|Training|kimg)' "$WORK/s64-resumed.log"
    grep -q 'Loading .*training-state-0000001' "$WORK/s64-resumed.log" && [ -f "$WORK/s64/training-state-0000002.pt" ] || return 1
    python generate_images.py --net="$WORK/s64/network-snapshot-0000002-0.100.pkl" --ts=10,22,39 --outdir="$WORK/generated" \
        --seeds=0-15 --grid="$WORK/generated.png" --device="$DEVICE"
}

exact_with_toy_student() {
    local student
    student=$(ls "$WORK"/toy/network-snapshot-*-0.100.pkl 2>/dev/null | tail -1)
    [ -n "$student" ] || { echo "no toy snapshot in $WORK/toy"; return 1; }
    python bench/exact.py --student="$student" --n=500 --pnp-images=1 --chains=50 --device="$DEVICE"
}

export -f toy_run stopped_and_resumed exact_with_toy_student
export WORK DEVICE PRESET TOY_ARGS
if [ "$DEVICE" = cuda ]; then
    python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || { echo "GPU check: FAIL (CUDA not available)"; exit 1; }
    MACHINE=$(python -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")')
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
else
    MACHINE=$(python -c 'import platform, torch; print(f"torch {torch.__version__}, {platform.machine()} CPU")')
    echo "rehearsal on $DEVICE: the plumbing of the GPU check, not its figures"
fi
echo "$MACHINE"
echo "mode $MODE; artifacts in $WORK; inductor cache $TORCHINDUCTOR_CACHE_DIR; budget $BUDGET s"
unpack_cache

if [ "$MODE" = check ]; then
    background toy "toy on $DEVICE" "$(limit 300)" toy_run
    background resume "img64-s fp16 run, stopped by SIGTERM and resumed, then generate_images.py" "$(limit 260)" stopped_and_resumed
    step "CUDA tests" "$(limit 180)" python -m pytest -q tests -k cuda -p no:cacheprovider
    collect resume
    collect toy
    step "bench/exact.py on $DEVICE" "$(limit 35)" exact_with_toy_student
    step "bench/sample.py" "$(limit 50)" python bench/sample.py "${BENCH[@]}" --repeats=3
elif [ "$MODE" = timing ]; then
    # The cold compile gets what the timed steps after it leave of the budget: 270 s of 480; BUDGET=590 gives it 380.
    OPTIONAL=1 step "compiled iteration, cold, alone (fills inductor's cache)" "$(limit $((BUDGET / SLOW - 210)))" \
        python bench/train_step.py "${BENCH[@]}" --iters=0 --warmup=0 --variant=compile=True
    pack_cache              # Before the timed steps: a call cut short still brings back what was compiled.
    COMPILED=(--variant=compile=True)
    if [ "$LAST_RC" != 0 ]; then    # Its first iteration would spend the step compiling: time and profile the rest.
        COMPILED=(); echo "the cold compile did not finish: the timed step leaves compile=True out (the cache keeps what was compiled)"
    fi
    step "bench/train_step.py eager${COMPILED[*]:+ and compiled}" "$(limit 150)" python bench/train_step.py "${BENCH[@]}" --iters=4 --warmup=1 \
        --variant=off=all --variant=default ${COMPILED[@]+"${COMPILED[@]}"} --profile=12
    OPTIONAL=1 step "bench/sample.py compiled" "$(limit 60)" python bench/sample.py "${BENCH[@]}" --repeats=3 --compile=True --profile=12
else
    step "bench/train_step.py options" "$(limit 220)" python bench/train_step.py "${BENCH[@]}" --iters=4 --warmup=1 \
        --variant=default --variant=off=grouped_weight_norm --variant=off=fast_pixel_norm --variant=off=fused_attention --variant=off=masked_clip \
        --variant=off=folded_scales --variant=off=cache_constant_weights --variant=off=flat_gradients --variant=off=pooled_resample --variant=off=qkv_blocks \
        --variant=precision=bf16
    [ "$DEVICE" = cuda ] && step "bench/train_step.py CUDA graphs" "$(limit 75)" python bench/train_step.py "${BENCH[@]}" \
        --iters=4 --warmup=1 --variant=default --variant=cuda_graphs=True
fi
pack_cache

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "GPU check: PASS"
else
    echo "GPU check: FAIL ($(IFS=';'; echo "${FAILED[*]}"))"
    exit 1
fi
