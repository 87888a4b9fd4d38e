#!/usr/bin/env python3
"""Build the bundled CLIP tokenizer (datasets/assets/clip/) from open_clip's BPE vocabulary.

open_clip_torch ships OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT licence). From it we build
the vocab and merges exactly as OpenAI's `SimpleTokenizer` and HF's `CLIPTokenizer` do, let HF
convert that to a fast `tokenizer.json`, and record HF `CLIPTokenizer` (the slow, reference
implementation) token ids for varied strings as a test fixture.

    /tmp/ref/bin/pip install transformers==4.57.1 open_clip_torch ftfy
    /tmp/ref/bin/python scripts/build_clip_tokenizer.py
"""

import gzip
import json
import os
import sys
import tempfile

import open_clip
import transformers
from transformers import CLIPTokenizer, CLIPTokenizerFast
from transformers.models.clip.tokenization_clip import bytes_to_unicode

PINNED_TRANSFORMERS = "4.57.1"
if transformers.__version__ != PINNED_TRANSFORMERS:
    sys.exit(f"transformers {transformers.__version__} found; pinned to {PINNED_TRANSFORMERS}")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ASSETS = os.path.join(ROOT, "datasets", "assets", "clip")
CASES = os.path.join(ROOT, "tests", "fixtures", "clip_tokenizer_cases.json")

STRINGS = [
    "a photo of a cat.",
    "A Photo Of A Dog",
    "an astronaut riding a horse on the moon",
    "",
    "   leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand newlines",
    "don't can't won't it's we're they've I'm you'll he'd",
    "numbers 12345 and 3.14159 and 1,000,000",
    "punctuation!!! ?? ... -- (brackets) [square] {curly}",
    "email@example.com and https://example.org/path?q=1",
    "café naïve résumé über",
    "日本語のテキスト",
    "emoji 🐱🐶 and symbols ©®™",
    "a" * 30,
    "supercalifragilisticexpialidocious",
    "CamelCaseWordsAndALLCAPS",
    "hyphen-ated and under_scored words",
    "a very long caption " * 12,
    "Zürich, São Paulo, Kraków",
    "x",
    "the quick brown fox jumps over the lazy dog",
    "<|endoftext|> in the middle",
    "quotes \"double\" and 'single'",
    "mixed 3d-printed 4k hdr photo",
]


def main():
    os.makedirs(ASSETS, exist_ok=True)
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        slow = CLIPTokenizer(vocab_file, merges_file, model_max_length=77, pad_token="<|endoftext|>")
        fast = CLIPTokenizerFast(vocab_file=vocab_file, merges_file=merges_file, model_max_length=77,
                                 pad_token="<|endoftext|>")
        fast.save_pretrained(tmp)
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            with open(os.path.join(tmp, name), encoding="utf-8") as f:
                content = f.read()
            with open(os.path.join(ASSETS, name), "w", encoding="utf-8") as f:
                f.write(content)

    cases = []
    for s in STRINGS:
        ids = slow(s, truncation=True, max_length=77)["input_ids"]
        cases.append({"text": s, "input_ids": ids})
    with open(CASES, "w", encoding="utf-8") as f:
        json.dump({"reference": f"transformers {transformers.__version__} CLIPTokenizer (slow)",
                   "max_length": 77, "cases": cases}, f, ensure_ascii=False, indent=1)
    mismatches = [c["text"] for c in cases if fast(c["text"], truncation=True, max_length=77)["input_ids"] != c["input_ids"]]
    print(f"wrote {ASSETS} and {len(cases)} cases; HF fast disagrees with slow on: {mismatches}")


if __name__ == "__main__":
    main()
