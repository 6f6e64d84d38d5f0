#!/usr/bin/env bash
# Every GPU measurement in one go (run on a CUDA machine from the repository root).
# Results go to $OUT (or ./gpu-results) as text/JSON files.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 benchmarks/forward.py --size FLAV-B/1 --device cuda --dtypes fp32,bf16 --batch 1,16 --repeats 5 2>&1 | tee "$OUT/forward.txt"
timeout 150 python3 benchmarks/generate.py --size FLAV-B/1 --device cuda --dtype bf16 --frames 200 --json 2>&1 | tee "$OUT/generate_b1.json"
timeout 150 python3 benchmarks/generate.py --size FLAV-B/1 --device cuda --dtype bf16 --frames 48 --batch-size 16 --json 2>&1 | tee "$OUT/generate_b16.json"
timeout 150 python3 benchmarks/forward.py --size FLAV-B/1 --device cuda --dtypes bf16 --batch 1,16 --repeats 5 --compile 2>&1 | tee "$OUT/forward_compile.txt"
