#!/usr/bin/env bash
# Runs every benchmark twice, candle-zoo's `zoo bench` then the PyTorch reference
# (scripts/bench_torch.py), on the same random-weight models and inputs of the same shapes, and
# writes BENCHMARKS.md and docs/benchmarks.png from the results.
#
#   bash scripts/bench_all.sh
#   THREADS=8 MODELS=/data/zoo-bench-models OUT=bench-results bash scripts/bench_all.sh
#
# PY       the Python with torch 2.15.0 and transformers 4.57.1   (/tmp/ref/bin/python)
# THREADS  threads for both sides: RAYON_NUM_THREADS for ours, torch.set_num_threads for
#          PyTorch                                               ($(nproc))
# MODELS   where `bench_torch.py make-models` writes the HF folders (/tmp/zoo-bench-models)
# OUT      one JSON per benchmark and side, machine.json, commands.txt  (bench-results)
# ZOO      our binary                                             (target/release/zoo)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-/tmp/ref/bin/python}
THREADS=${THREADS:-$(nproc)}
MODELS=${MODELS:-/tmp/zoo-bench-models}
OUT=${OUT:-bench-results}
ZOO=${ZOO:-target/release/zoo}

cargo build --release --bin zoo
"$PY" scripts/bench_torch.py make-models "$MODELS"
mkdir -p "$OUT"
"$PY" scripts/bench_torch.py machine --threads "$THREADS" >"$OUT/machine.json"
: >"$OUT/commands.txt"

# A benchmark that fails leaves no JSON (the report shows it as not run), the others still run,
# and the script exits non-zero at the end.
failed=()

# record FILE COMMAND...: logs the command and runs it with its stdout into FILE.
record() {
    local file=$1
    shift
    echo "$*" | tee -a "$OUT/commands.txt" >&2
    if ! "$@" >"$file"; then
        echo "FAILED: $*" >&2
        rm -f "$file"
        failed+=("$file")
    fi
}

# ours NAME ARGS...: `zoo bench ARGS --json` into $OUT/NAME-candle-zoo.json, its threads set by
# RAYON_NUM_THREADS on the command itself, so that commands.txt shows them.
ours() {
    local name=$1
    shift
    record "$OUT/$name-candle-zoo.json" env RAYON_NUM_THREADS="$THREADS" "$ZOO" bench "$@" --json
}

# theirs NAME ARGS...: `bench_torch.py ARGS --threads $THREADS` into $OUT/NAME-pytorch.json.
theirs() {
    local name=$1
    shift
    record "$OUT/$name-pytorch.json" "$PY" scripts/bench_torch.py "$@" --threads "$THREADS"
}

# both NAME ARGS...: the same benchmark, ours then theirs.
both() {
    ours "$@"
    theirs "$@"
}

for model in clip-vit-b-32 siglip-base-patch16-224; do
    both "embed-$model" embed --model "$MODELS/$model" --batch 8 --warmup 1 --repeats 5
done
for model in clip-vit-b-32 siglip-base-patch16-224; do
    both "train-step-$model" train-step --model "$MODELS/$model" --batch 16 --warmup 1 --steps 5
done
both caption-blip-small caption --model "$MODELS/blip-small" --images 5 --max-new-tokens 20 \
    --warmup 1
both generate-llama-small generate --model "$MODELS/llama-small" \
    --prompts scripts/bench_prompts.txt --max-new-tokens 64 --warmup 1
for mode in forward train; do
    both "attention-$mode" attention --lengths 256,512,1024,2048,4096 --heads 8 --head-dim 64 \
        --causal --mode "$mode" --repeats 5
done

# Written aside first: the report reads the previous BENCHMARKS.md to keep its analysis.
"$PY" scripts/bench_report.py "$OUT" --previous BENCHMARKS.md >"$OUT/BENCHMARKS.md"
cp "$OUT/BENCHMARKS.md" BENCHMARKS.md
echo "wrote BENCHMARKS.md and docs/benchmarks.png (results in $OUT/)" >&2
if ((${#failed[@]})); then
    echo "failed, so missing from the report: ${failed[*]}" >&2
    exit 1
fi
