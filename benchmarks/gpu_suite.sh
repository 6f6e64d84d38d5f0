#!/usr/bin/env bash
# Every GPU measurement (run on a CUDA machine from the repository root), in parts of under
# 10 minutes each, every step bounded so that one slow or failing step cannot eat the others'
# time. With a short loan, run 3, then 4, then 6, then 5: each closes the most per minute.
#   bash benchmarks/gpu_suite.sh 1    GPU tests, batch 1 end to end (eager, compiled cold and warm), batch 16 eager
#   bash benchmarks/gpu_suite.sh 2    batch 16 compiled, attention backends, correctness of the fast
#                                     paths and stage costs, one stream, what the card allows
#   bash benchmarks/gpu_suite.sh 3    GPU tests; 64 clips on 1 vs 2 processes; generate's defaults for
#                                     60 s (background compile, cold cache); where the first frame's
#                                     pre-roll time goes (if time is left)
#   bash benchmarks/gpu_suite.sh 4    rflav serve watched live by the http player for LIVE_MINUTES (5)
#                                     (first fragment, stalls, memory), FLAV-B/1 at batch 1
#   bash benchmarks/gpu_suite.sh 6    the rest of the speed card: defaults for 10 s and 60 s (cache as
#                                     part 3 left it), muxing against --no-mux, eager as a CUDA graph,
#                                     batch 16, fp32 with and without TF32
#   bash benchmarks/gpu_suite.sh 5    against the reference code on this card (benchmarks/vs_reference.sh;
#                                     REF and REF_BENCH name the reference code and its timing script,
#                                     by default .ref/ and .ref/ref_bench.py)
#   bash benchmarks/gpu_suite.sh      1 and 2
# Logs go to $OUT/suite-<part>.log (OUT defaults to ./gpu-results); checkpoints, compile caches
# and clips to $WORK (default /tmp/rflav-gpu), so that OUT holds only what should come back.
# On a CUDA image that lacks some of rflav's packages, bring them as wheels (benchmarks/gpu_wheels.sh)
# and start with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -u
PART=${1:-all}
OUT=${OUT:-gpu-results}
WORK=${WORK:-/tmp/rflav-gpu}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/suite-$PART.log"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
export TORCHINDUCTOR_MAX_AUTOTUNE=0

step() {  # title, timeout, command...
    local title=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $title" | tee -a "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    echo "--- rc $? after $((SECONDS - start)) s" | tee -a "$LOG"
}

gen() {  # title, timeout, generate.py arguments
    local title=$1 limit=$2 start=$SECONDS tmp
    shift 2
    tmp=$(mktemp)
    echo "=== $title" | tee -a "$LOG"
    timeout "$limit" python3 benchmarks/generate.py --size FLAV-B/1 --device cuda --dtype bf16 --json "$@" > "$tmp" 2>&1
    local rc=$?
    if [ $rc = 0 ]; then tail -n 1 "$tmp" | tee -a "$LOG"; else tail -n 25 "$tmp" | tee -a "$LOG"; fi
    echo "--- rc $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    rm -f "$tmp"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee -a "$LOG"

if [ "$PART" = 1 ] || [ "$PART" = all ]; then
    step "GPU tests" 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
    tail -n 3 "$LOG"
    gen "batch 1 eager" 60 --frames 200
    gen "batch 1 compiled (cold cache)" 120 --frames 300 --compile
    gen "batch 1 compiled (warm cache)" 60 --frames 300 --compile
    gen "batch 16 eager" 60 --frames 48 --batch-size 16
fi

if [ "$PART" = 2 ] || [ "$PART" = all ]; then
    gen "batch 16 compiled" 100 --frames 64 --batch-size 16 --compile
    step "forward, batch 1, attention backends" 45 python3 benchmarks/forward.py --size FLAV-B/1 --device cuda \
        --dtypes bf16 --batch 1 --attention sdpa,matmul --repeats 20
    tail -n 4 "$LOG"
    step "fast paths and stage costs" 120 python3 benchmarks/gpu_checks.py --size FLAV-B/1 --device cuda
    tail -n 8 "$LOG"
    gen "batch 1 compiled, one stream" 50 --frames 300 --compile --no-overlap
    step "what the card allows" 30 python3 benchmarks/matmul_peak.py --device cuda --batch 1,16 --repeats 10
    tail -n 6 "$LOG"
fi

checkpoint() {  # random weights of the released FLAV-B/1 shapes, built once per machine
    [ -d "$WORK/random-b1/model" ] || python3 -c \
        "from rflav_cli.bench import build_random_checkpoint as b; b('$WORK/random-b1', 'FLAV-B/1')" >> "$LOG" 2>&1
}

if [ "$PART" = 3 ] || [ "$PART" = 6 ]; then
    # Our own compile cache, cold at the start of part 3 (an image's own cache folders would win).
    unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
    export RFLAV_COMPILE_CACHE="$WORK/compile-cache"
fi

if [ "$PART" = 3 ]; then
    step "GPU tests" 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
    tail -n 3 "$LOG"
    checkpoint
    clips() {  # title, processes
        local dir="$WORK/clips-$2" start=$SECONDS
        rm -rf "$dir"
        echo "=== $1" | tee -a "$LOG"
        timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node "$2" -m rflav_cli generate \
            --model "$WORK/random-b1/model" --vae "$WORK/random-b1/vae" --frames "${CLIP_FRAMES:-30}" \
            --num-samples "${CLIPS:-64}" --batch-size 16 --quiet -o "$dir/" >> "$LOG" 2>&1
        echo "--- rc $? after $((SECONDS - start)) s, $(grep -c '"complete"' "$dir/manifest.jsonl" 2>/dev/null) clips" \
            | tee -a "$LOG"
    }
    clips "${CLIPS:-64} clips of ${CLIP_FRAMES:-30} frames, batch 16, 1 process" 1
    clips "${CLIPS:-64} clips of ${CLIP_FRAMES:-30} frames, batch 16, 2 processes on one card" 2
    rm -rf "$RFLAV_COMPILE_CACHE"  # cold: the first compilation on this machine
    gen "defaults, 600 frames (compiles in the background, cold cache)" 120 --frames 600 --defaults
    if [ $SECONDS -lt 480 ]; then  # only if the call's 10 minutes allow it
        step "first frame: where the pre-roll's time goes" 90 python3 benchmarks/first_frame.py \
            --size FLAV-B/1 --device cuda --dtype bf16 --cases preroll-calls,preroll-calls-prefix,stages,preroll-profile
        tail -n 6 "$LOG"
    fi
fi

if [ "$PART" = 4 ]; then
    checkpoint
    step "live: ${LIVE_MINUTES:-5}-minute stream, http player" 560 python3 benchmarks/live.py --player http \
        --model "$WORK/random-b1/model" --vae "$WORK/random-b1/vae" --device cuda --minutes "${LIVE_MINUTES:-5}" --json
    tail -n 3 "$LOG"
fi

if [ "$PART" = 6 ]; then
    gen "defaults, 600 frames (compile cache as part 3 left it)" 100 --frames 600 --defaults
    gen "defaults, 100 frames (eager)" 40 --frames 100 --defaults
    gen "defaults, 100 frames, no MP4" 40 --frames 100 --defaults --no-mux
    gen "eager as a CUDA graph, 100 frames" 40 --frames 100 --cuda-graph
    gen "eager as a CUDA graph, 100 frames, no MP4" 40 --frames 100 --cuda-graph --no-mux
    gen "defaults, batch 16, 100 frames" 100 --frames 100 --batch-size 16 --defaults
    gen "defaults, batch 16, 100 frames, no MP4" 100 --frames 100 --batch-size 16 --defaults --no-mux
    gen "eager as a CUDA graph, batch 16, 100 frames" 100 --frames 100 --batch-size 16 --cuda-graph
    step "forward fp32 with TF32" 40 python3 -m rflav_cli bench --forward-only --dtype fp32 --json
    tail -n 14 "$LOG"
    step "forward fp32 without TF32" 40 python3 -m rflav_cli bench --forward-only --dtype fp32 --no-tf32 --json
    tail -n 14 "$LOG"
fi

if [ "$PART" = 5 ]; then
    step "against the reference" 580 env OUT="$OUT" REF="${REF:-.ref}" REF_BENCH="${REF_BENCH:-.ref/ref_bench.py}" \
        CASES="${CASES:-100:1 600:1}" bash benchmarks/vs_reference.sh
    tail -n 8 "$LOG"
fi
