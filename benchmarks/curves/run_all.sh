#!/usr/bin/env bash
# Fig. 4 / Fig. 5 in chunks of at most 2 h of one core each; every finished unit is committed by curves.py
# (--commit), so the loop can be killed at any time and rerun: it resumes from the unit files in the repo.
#   nohup benchmarks/curves/run_all.sh > /tmp/curves.log 2>&1 &
# CODE (default: this checkout) is where the code runs from; a snapshot lets you edit the checkout meanwhile.
set -u
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
CODE="${CODE:-$REPO}"
PY="${PY:-python}"
OUT="$REPO/benchmarks/results/curves"
export PYTHONPATH="$CODE/src:$CODE" OMP_NUM_THREADS=1
chunk() {  # rerun one chunk (budget 120 min per process) until a run ends without spending its budget
    for _ in 1 2 3 4 5 6; do
        nice -n 5 "$PY" -m benchmarks.curves --commit --budget-minutes 120 --out "$OUT" "$@" \
            | tee /tmp/curves_chunk.log
        git -C "$REPO" add "$OUT/curves.md" "$OUT"/*.png 2>/dev/null
        git -C "$REPO" commit -q -m "curves: tables and plots after a chunk ($*)" -- "$OUT/curves.md" "$OUT"/*.png
        grep -q "budget spent" /tmp/curves_chunk.log || return 0
    done
}
chunk --stages fig4 --tasks mquake clutrr --methods lofit lora --sizes 16 32 64 100
chunk --stages fig4 --tasks mquake clutrr --methods lofit lora
chunk --stages fig4 --tasks truthfulqa --methods lofit lora
chunk --stages fig4 --tasks mquake clutrr truthfulqa --methods red
chunk --stages fig5 --tasks mquake clutrr
