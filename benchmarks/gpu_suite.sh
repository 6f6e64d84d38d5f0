#!/usr/bin/env bash
# Every GPU measurement in one go (run on a CUDA machine from the repository root), most
# important first, each step bounded so that one slow step cannot eat the others' time.
# Results go to $OUT (or ./gpu-results) as text/JSON files; about 8 minutes on an H100.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
export TORCHINDUCTOR_MAX_AUTOTUNE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

# The GPU-only paths' tests (skipped on machines without CUDA).
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 15 | tee "$OUT/test_cuda.txt"

# What the card allows: bf16/fp32 matrix throughput and the FLOP floor of one forward.
timeout 60 python3 benchmarks/matmul_peak.py --device cuda --batch 1,16 --repeats 20 2>&1 | tee "$OUT/matmul_peak.txt"

gen() {  # name, timeout, generate.py arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 benchmarks/generate.py --size FLAV-B/1 --device cuda --dtype bf16 --json "$@" \
        > "$OUT/$name.json" 2> "$OUT/$name.log"
    tail -n 1 "$OUT/$name.json"
}

# End to end (sampling + VAE + vocoder + MP4), eager and compiled, batch 1 and 16.
gen generate_b1_compiled 150 --frames 300 --compile
gen generate_b1_eager 90 --frames 200
gen generate_b16_compiled 180 --frames 64 --batch-size 16 --compile
gen generate_b16_eager 120 --frames 48 --batch-size 16

gen generate_b1_compiled_serial 120 --frames 300 --compile --no-overlap

# Correctness of the fast paths and the cost of each stage per frame.
timeout 200 python3 benchmarks/gpu_checks.py --size FLAV-B/1 --device cuda 2>&1 | tee "$OUT/gpu_checks.txt"

# One bf16 forward: both attention backends, eager / compiled; then where the compiled time goes.
timeout 200 python3 benchmarks/forward.py --size FLAV-B/1 --device cuda --dtypes bf16 --batch 1,16 \
    --attention sdpa,matmul --repeats 10 --compile 2>&1 | tee "$OUT/forward.txt"
timeout 120 python3 benchmarks/profile_forward.py --size FLAV-B/1 --batch 1 --compile default,reduce-overhead \
    > "$OUT/profile_forward.txt" 2>&1
tail -n 5 "$OUT/profile_forward.txt"
