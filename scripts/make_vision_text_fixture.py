#!/usr/bin/env python3
"""Make the HF VisionTextDualEncoderModel (CLIP image tower + BERT text tower) reference that
trainers/tests/bert_tower.rs compares against.

Run from the repository root (CI never runs this; the outputs are committed):

    /tmp/ref/bin/pip install torch transformers==4.57.1 safetensors
    /tmp/ref/bin/python scripts/make_vision_text_fixture.py

Writes tests/fixtures/vision-text-tiny/: config.json and model.safetensors as HF saves them (no
`text_pooling` field, so zoo must use BERT's pooler as HF does), and reference.safetensors with
pixel_values, input_ids (right-padded), attention_mask, and HF's image_embeds, text_embeds and
logits_per_image.
"""

import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file

PINNED_TRANSFORMERS = "4.57.1"
if transformers.__version__ != PINNED_TRANSFORMERS:
    sys.exit(f"transformers {transformers.__version__} found; the fixtures are pinned to {PINNED_TRANSFORMERS}")

from transformers import (  # noqa: E402
    BertConfig,
    CLIPVisionConfig,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "vision-text-tiny")


def randomise(model, seed):
    """Weights that make every tensor matter (HF's init zeroes biases and sets LayerNorms to 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name == "logit_scale":
                p.fill_(2.0)
            else:
                p.copy_(0.2 * noise)


def main():
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8)
    text = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=24)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=24)
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel(config).eval()
    randomise(model, 30)
    gen = torch.Generator().manual_seed(31)
    pixel_values = torch.randn(2, 3, 16, 16, generator=gen)
    input_ids = torch.randint(1, 100, (3, 8), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    for row, n in enumerate([8, 5, 3]):
        attention_mask[row, n:] = 0
        input_ids[row, n:] = 0
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    model.save_pretrained(OUT, safe_serialization=True)
    tensors = {
        "pixel_values": pixel_values,
        "input_ids": input_ids.long(),
        "attention_mask": attention_mask.long(),
        "image_embeds": out.image_embeds,
        "text_embeds": out.text_embeds,
        "logits_per_image": out.logits_per_image,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "reference.safetensors"))
    print("wrote", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
