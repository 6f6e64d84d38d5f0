#!/usr/bin/env bash
# rflav against the reference code on the same GPU, in one go: 10 s and 60 s clips at batch 1 and
# 16, each side with its default flags (the reference: fp32 with TF32, every frame kept on the
# GPU, decoded at the end, no file written; rflav: `rflav generate`'s defaults, MP4 included).
#
#   REF=path/to/reference-code REF_BENCH=path/to/ref_bench.py bash benchmarks/vs_reference.sh
#
# REF is an unpacked copy of the reference repository (not part of this project) and REF_BENCH
# the script that times its own generation path. Each run is a fresh process; the JSON lines go
# to $OUT/vs_reference.jsonl (their messages to vs_reference.err) and the ratios are printed at
# the end (benchmarks/ratios.py).
set -u
OUT=${OUT:-gpu-results}
REF=${REF:?set REF to the reference code folder}
REF_BENCH=${REF_BENCH:?set REF_BENCH to ref_bench.py}
LIMIT=${LIMIT:-240}      # seconds per run
CASES=${CASES:-"100:1 600:1 100:16 600:16"}   # frames:batch
mkdir -p "$OUT"
LOG="$OUT/vs_reference.jsonl"
ERR="$OUT/vs_reference.err"  # both sides' messages, for a run that failed
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD

for case in $CASES; do
    frames=${case%%:*} batch=${case##*:}
    start=$SECONDS
    line=$(timeout "$LIMIT" python3 "$REF_BENCH" --ref "$REF" --frames "$frames" --batch "$batch" 2>>"$ERR" | tail -n 1)
    echo "reference $frames frames, batch $batch: ${line:-failed} ($((SECONDS - start)) s)" >&2
    [ -n "$line" ] && echo "$line" >> "$LOG"
    start=$SECONDS
    line=$(timeout "$LIMIT" python3 benchmarks/generate.py --size FLAV-B/1 --device cuda --frames "$frames" \
        --batch-size "$batch" --defaults --json 2>>"$ERR" | tail -n 1)
    echo "rflav $frames frames, batch $batch: ${line:-failed} ($((SECONDS - start)) s)" >&2
    [ -n "$line" ] && echo "$line" >> "$LOG"
done
python3 benchmarks/ratios.py "$LOG"
