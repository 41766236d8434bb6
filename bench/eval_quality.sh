#!/usr/bin/env bash
# qwenrt eval on the demo model, the three named corpora, 8,192 scored tokens each (the float
# reference computed on the first run of each, then cached); then English again, timed, with
# the reference cached (the issue's 3-minute target). -> bench/eval_*.json, .md
set -euo pipefail
cd "$(dirname "$0")/.."
QWENRT=${QWENRT:-.venv/bin/qwenrt}
for corpus in english code chinese; do
  "$QWENRT" eval --corpus "$corpus" --json "bench/eval_$corpus.json" --markdown "bench/eval_$corpus.md"
done
start=$(date +%s.%N)
"$QWENRT" eval --corpus english --json bench/eval_english_cached.json --markdown bench/eval_english_cached.md
echo "english again, reference cached: $(echo "$(date +%s.%N) - $start" | bc) s" | tee bench/eval_cached_seconds.txt
