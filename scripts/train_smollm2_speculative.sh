#!/usr/bin/env bash
# Self-distilled Medusa heads and an MTP module for SmolLM2-135M-Instruct, trained on the frozen
# GGUF model on the CPU, then cut to f16 files of their own weights for data/smollm2-135m-instruct/.
#
#   scripts/train_smollm2_speculative.sh SmolLM2-135M-Instruct.Q4_1.gguf OUT [ZOO]
#
# 1. Chat prompts (scripts/smollm2_prompts.py: templates and topic lists of this project, split
#    into training and validation prompts with none in common).
# 2. `zoo train medusa --self-distill --chat`: SmolLM2 renders every prompt with its chat
#    template and writes its greedy reply (batched by rendered length); 3 heads of one ResBlock
#    sharing the model's lm_head learn on those conversations (one per row, the replies
#    scored), on the draft vocabulary that decoding drafts from (--draft-vocab). The heads'
#    per-rank accuracy on the validation prompts' replies goes to medusa_accuracy.json
#    (--medusa-choices auto).
# 3. `zoo train mtp --freeze-backbone`: two MTP modules, starting from the last layer, on the
#    same conversations (OUT/medusa/self_distill.jsonl, whose prompts are not scored) and the
#    same draft vocabulary, the model frozen.
# 4. The heads and the module's tensors converted to f16 (the model's own weights are left out:
#    they are the GGUF's).
# Knobs: PROMPTS (training prompts, 800), VAL (validation prompts, 48), MEDUSA_HEADS (3),
# MEDUSA_STEPS (160), MTP_STEPS (320), DRAFT_VOCAB (8192; empty: the whole vocabulary), PY (a
# python with numpy and safetensors, for step 4).
set -euo pipefail
gguf=$1
out=$2
zoo=${3:-target/release/zoo}
py=${PY:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
draft_vocab=${DRAFT_VOCAB-8192}
python3 "$here/smollm2_prompts.py" "$out" "${PROMPTS:-800}" "${VAL:-48}"
lscpu | grep -E "Model name|Flags" > "$out/lscpu.txt"
/usr/bin/time -v "$zoo" train medusa --model "$gguf" --self-distill --chat \
  --distill-temperature 0 --train-data "$out/prompts-train.txt" --val-data "$out/prompts-val.txt" \
  --medusa-num-heads "${MEDUSA_HEADS:-3}" --medusa-num-layers 1 --medusa-shared-lm-head \
  ${draft_vocab:+--draft-vocab "$draft_vocab"} --seq-len 256 --batch-size 4 \
  --steps "${MEDUSA_STEPS:-160}" --lr 2e-3 --warmup 10 --wd 0 --grad-clip-norm 1.0 \
  --output "$out/medusa" 2> "$out/medusa-time.txt"
/usr/bin/time -v "$zoo" train mtp --model "$gguf" --freeze-backbone --mtp-depth 2 \
  --train-data "$out/medusa/self_distill.jsonl" ${draft_vocab:+--draft-vocab "$draft_vocab"} \
  --seq-len 256 --batch-size 4 --steps "${MTP_STEPS:-320}" --lr 2e-3 --warmup 10 --wd 0 --grad-clip-norm 1.0 \
  --output "$out/mtp" 2> "$out/mtp-time.txt"
"$py" - "$out" <<'PY'
import json, os, shutil, sys
import numpy as np
from safetensors.numpy import load_file, save_file
out = sys.argv[1]
dest = os.path.join(out, "export")
for kind in ("medusa", "mtp"):
    os.makedirs(os.path.join(dest, kind), exist_ok=True)
heads = load_file(os.path.join(out, "medusa/final/medusa_lm_head.safetensors"))
save_file({k: v.astype(np.float16) for k, v in heads.items()},
          os.path.join(dest, "medusa/medusa_lm_head.safetensors"))
for f in ("config.json", "medusa_accuracy.json"):
    shutil.copy(os.path.join(out, "medusa/final", f), os.path.join(dest, "medusa", f))
cfg = json.load(open(os.path.join(out, "mtp/final/config.json")))
layers = cfg["num_hidden_layers"]
weights = load_file(os.path.join(out, "mtp/final/model.safetensors"))
module = {k: v.astype(np.float16) for k, v in weights.items()
          if k.startswith("model.layers.") and int(k.split(".")[2]) >= layers}
save_file(module, os.path.join(dest, "mtp/model.safetensors"))
cfg["torch_dtype"] = "float16"
json.dump(cfg, open(os.path.join(dest, "mtp/config.json"), "w"), indent=2)
print("exported", sorted(os.listdir(os.path.join(dest, "medusa"))), len(module), "MTP tensors")
PY
