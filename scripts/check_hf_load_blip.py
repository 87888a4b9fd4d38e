#!/usr/bin/env python3
"""Check that a BLIP folder written by `zoo train blip` loads in HF transformers and scores and
captions like `zoo`.

    zoo train blip --objective pretrain --train-data synthetic --steps 100 --batch-size 16 \
        --queue-size 0 --output /tmp/zoo-blip
    zoo match --model /tmp/zoo-blip/final --image IMG --text "a small red circle on the left" \
        --text "a large blue cross at the top" --json > /tmp/zoo-match.json
    zoo caption --model /tmp/zoo-blip/final --max-new-tokens 20 --json IMG > /tmp/zoo-caption.json
    /tmp/ref/bin/python scripts/check_hf_load_blip.py /tmp/zoo-blip/final /tmp/zoo-match.json \
        /tmp/zoo-caption.json

Loads the folder with HF's BlipProcessor, BlipForImageTextRetrieval (when `zoo match` output is
given) and BlipForConditionalGeneration, recomputes itm_prob / itc_score for every pair and the
greedy caption of every image, and reports the largest difference and whether the token ids
agree. Exits non-zero above 1e-4 or on any differing caption.
"""

import json
import sys

import torch
import transformers
from PIL import Image

PINNED_TRANSFORMERS = "4.57.1"


def main(model_dir, match_file, caption_file):
    if transformers.__version__ != PINNED_TRANSFORMERS:
        print(f"warning: transformers {transformers.__version__}, checked against {PINNED_TRANSFORMERS}")
    processor = transformers.BlipProcessor.from_pretrained(model_dir)
    failed = False

    retrieval = transformers.BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    worst = 0.0
    for pair in json.load(open(match_file)):
        inputs = processor(images=Image.open(pair["image"]), text=pair["text"], return_tensors="pt")
        with torch.no_grad():
            itm = retrieval(**inputs, use_itm_head=True).itm_score.softmax(-1)[0, 1].item()
            itc = retrieval(**inputs, use_itm_head=False).itm_score[0, 0].item()
        diff = max(abs(itm - pair["itm_prob"]), abs(itc - pair["itc_score"]))
        worst = max(worst, diff)
        print(f"{pair['text']!r}: itm_prob HF {itm:.6f} zoo {pair['itm_prob']:.6f}; "
              f"itc_score HF {itc:.6f} zoo {pair['itc_score']:.6f}")
    print(f"BlipForImageTextRetrieval: max abs diff {worst:.2e}")
    failed |= worst > 1e-4

    captioner = transformers.BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    for item in json.load(open(caption_file)):
        inputs = processor(images=Image.open(item["image"]), return_tensors="pt")
        with torch.no_grad():
            ids = captioner.generate(**inputs, max_new_tokens=len(item["token_ids"]) - 1)[0].tolist()
        same = ids == item["token_ids"]
        print(f"{item['image']}: HF {ids} zoo {item['token_ids']} {'same' if same else 'DIFFERENT'}")
        failed |= not same
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
