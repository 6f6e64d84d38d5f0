#!/usr/bin/env bash
# The Python packages rflav needs that a bare CUDA image with PyTorch may lack, downloaded as
# wheels into .whl/ (for a machine without network access; Python 3.12, x86-64):
#   bash benchmarks/gpu_wheels.sh            # here, where pip can reach the registry
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site   # there
# diffusers is for the reference side of benchmarks/vs_reference.sh only (Python 3.12 has what it
# would take from importlib_metadata);
# imageio-ffmpeg 0.5.1 carries the smallest ffmpeg build (27 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in ffmpeg-python future imageio-ffmpeg==0.5.1 starlette uvicorn diffusers; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pkg" \
        || echo "warning: no wheel for $pkg" >&2
done
du -sh .whl
