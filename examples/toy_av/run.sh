#!/usr/bin/env bash
# The whole toy experiment on a CPU: data, training in pixel space, samples, agreement score.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-toy-av}
mkdir -p "$work" && cd "$work"

python "$here/make_dataset.py" data --train 64 --test 8 --seconds 4 --size 32
echo '{"depth": 4, "hidden_size": 128, "num_heads": 4, "patch_size": 4}' > model.json

# About 26 minutes on 2 CPU cores; Ctrl-C at any time saves a checkpoint you can sample from.
rflav train data -o run --model-config model.json --autoencoder none --vocoder none \
    --image-size 32 --window 5 --batch-size 8 --lr 5e-4 --max-steps 5500 --save-every 500 --device cpu

rflav generate --model run/latest --frames 40 --num-samples 16 --batch-size 16 -o samples --device cpu
python "$here/score.py" samples      # generated clips: pitch follows the ball?
python "$here/score.py" data/test    # the same score on real clips, for reference
