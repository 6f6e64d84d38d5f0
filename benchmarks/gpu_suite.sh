#!/usr/bin/env bash
# Every GPU measurement (run on a CUDA machine from the repository root), in two parts of
# under 10 minutes each, most important first, every step bounded so that one slow step cannot
# eat the others' time:
#   bash benchmarks/gpu_suite.sh 1    GPU tests, what the card allows, end-to-end speed
#   bash benchmarks/gpu_suite.sh 2    correctness of the fast paths, stage costs, forward table, profile
#   bash benchmarks/gpu_suite.sh      both
# Results go to $OUT (or ./gpu-results) as text/JSON files.
set -u
PART=${1:-all}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
export TORCHINDUCTOR_MAX_AUTOTUNE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

gen() {  # name, timeout, generate.py arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 benchmarks/generate.py --size FLAV-B/1 --device cuda --dtype bf16 --json "$@" \
        > "$OUT/$name.json" 2> "$OUT/$name.log"
    echo "$name: $(tail -n 1 "$OUT/$name.json")"
}

if [ "$PART" = 1 ] || [ "$PART" = all ]; then
    # The GPU-only paths' tests (skipped on machines without CUDA).
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 15 | tee "$OUT/test_cuda.txt"
    # What the card allows: bf16/fp32 matrix throughput and the FLOP floor of one forward.
    timeout 45 python3 benchmarks/matmul_peak.py --device cuda --batch 1,16 --repeats 20 2>&1 | tee "$OUT/matmul_peak.txt"
    # End to end (sampling + VAE + vocoder + MP4): compiled / eager / compiled on one stream.
    gen generate_b1_compiled 100 --frames 300 --compile
    gen generate_b1_eager 70 --frames 200
    gen generate_b16_compiled 110 --frames 64 --batch-size 16 --compile
    gen generate_b16_eager 80 --frames 48 --batch-size 16
    gen generate_b1_compiled_serial 70 --frames 300 --compile --no-overlap
fi

if [ "$PART" = 2 ] || [ "$PART" = all ]; then
    # Correctness of the fast paths and the cost of each stage per frame.
    timeout 180 python3 benchmarks/gpu_checks.py --size FLAV-B/1 --device cuda 2>&1 | tee "$OUT/gpu_checks.txt"
    # One bf16 forward: the attention backends at batch 1, batch 16 with the default; eager and
    # compiled each; then where the time goes.
    timeout 200 python3 benchmarks/forward.py --size FLAV-B/1 --device cuda --dtypes bf16 --batch 1 \
        --attention sdpa,matmul,short-matmul --repeats 10 --compile 2>&1 | tee "$OUT/forward.txt"
    timeout 100 python3 benchmarks/forward.py --size FLAV-B/1 --device cuda --dtypes bf16 --batch 16 \
        --repeats 5 --compile 2>&1 | tee -a "$OUT/forward.txt"
    timeout 90 python3 benchmarks/profile_forward.py --size FLAV-B/1 --batch 1 --compile default \
        > "$OUT/profile_forward.txt" 2>&1
    tail -n 5 "$OUT/profile_forward.txt"
fi
