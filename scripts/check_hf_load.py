#!/usr/bin/env python3
"""Check that a checkpoint trained by `zoo` loads in HF transformers and embeds like `zoo`.

    cargo run --release -- train clip --train-data synthetic --steps 50 --output /tmp/zoo-run
    cargo run --release -- embed --model /tmp/zoo-run/final --image tests/fixtures/images/chelsea.png \
        --text "a small red circle on the left" --text "a large blue cross at the top" --out /tmp/zoo-emb.safetensors
    /tmp/ref/bin/python scripts/check_hf_load.py /tmp/zoo-run/final /tmp/zoo-emb.safetensors

Loads the folder with `CLIPModel` / `SiglipModel`.from_pretrained, feeds it the exact inputs zoo
used (`input_ids`, `pixel_values` from the embed output), and reports the largest difference of
the normalised embeddings and of `logits_per_image`. Exits non-zero above 1e-4.
"""

import json
import sys

import torch
import transformers
from safetensors.torch import load_file

PINNED_TRANSFORMERS = "4.57.1"


def main(model_dir, embed_file):
    if transformers.__version__ != PINNED_TRANSFORMERS:
        print(f"warning: transformers {transformers.__version__}, checked against {PINNED_TRANSFORMERS}")
    kind = json.load(open(f"{model_dir}/config.json"))["model_type"]
    cls = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}[kind]
    model = cls.from_pretrained(model_dir).eval()
    zoo = load_file(embed_file)
    ids = zoo["input_ids"]
    kwargs = {}
    if kind == "clip":
        pad = transformers.AutoTokenizer.from_pretrained(model_dir).pad_token_id
        # zoo pads CLIP text to the longest caption and masks the padding, as CLIPProcessor does.
        mask = torch.ones_like(ids)
        for row in range(ids.shape[0]):
            eos = (ids[row] == model.config.text_config.eos_token_id).nonzero()
            if len(eos):
                mask[row, eos[0, 0] + 1:] = 0
        kwargs["attention_mask"] = mask
        del pad
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=zoo["pixel_values"], **kwargs)
    report = {}
    for name in ["image_embeds", "text_embeds", "logits_per_image"]:
        report[name] = (getattr(out, name) - zoo[name]).abs().max().item()
    print(json.dumps({"model_type": kind, "max_abs_diff": report}, indent=1))
    return 0 if max(report.values()) < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
