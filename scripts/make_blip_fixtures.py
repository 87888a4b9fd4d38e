#!/usr/bin/env python3
"""Make the BLIP reference checkpoints and outputs that models/tests/blip.rs compares against.

Run from the repository root (CI never runs this; the outputs are committed):

    python3 -m venv /tmp/ref
    /tmp/ref/bin/pip install torch transformers==4.57.1 tokenizers==0.22.2 safetensors
    /tmp/ref/bin/python scripts/make_blip_fixtures.py

Writes under tests/fixtures/:
  blip-tiny-caption/  BlipForConditionalGeneration with random weights: the vision tower's
                      `last_hidden_state` (after post_layernorm), decoder logits and LM loss
                      (plain and with label smoothing 0.1) for given input_ids, and greedy `generate` outputs with and without a prompt
  blip-tiny-itm/      BlipForImageTextRetrieval with random weights: ITM logits
                      (`use_itm_head=True`) and ITC scores (`use_itm_head=False`) for a padded
                      batch of texts
      each with config.json, model.safetensors and reference.safetensors
"""

import json
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
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures")

# A vocabulary of 120 ids that holds the special ids BLIP's generation relies on.
TEXT = dict(
    vocab_size=120,
    hidden_size=32,
    encoder_hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=40,
    bos_token_id=110,  # [DEC]
    sep_token_id=102,  # [SEP], where generation stops
    eos_token_id=2,
    pad_token_id=0,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
CLS, SEP = 101, 102


def config():
    return BlipConfig(
        text_config=TEXT, vision_config=VISION, projection_dim=24, image_text_hidden_size=16
    )


def randomise(model, seed):
    """Weights that make every tensor matter, so a wrongly loaded bias or LayerNorm shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "LayerNorm.weight" in name or "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def save(model, name, tensors):
    path = os.path.join(OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "reference.safetensors"))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{name}: {size} bytes")


def pixels(seed, n):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, 32, 32), generator=gen)


def make_caption():
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config()).eval()
    randomise(model, 1)
    # The checkpoint ties the LM head to the word embeddings; make sure of it.
    head = model.text_decoder.cls.predictions.decoder.weight
    emb = model.text_decoder.bert.embeddings.word_embeddings.weight
    assert head.data_ptr() == emb.data_ptr(), "the LM head is not tied"

    pixel_values = pixels(2, 2)
    # [DEC] + tokens, as the captioning loss sees them (HF replaces [CLS] with bos).
    input_ids = torch.tensor([[110, 5, 17, 33, 60, 7, 102], [110, 44, 9, 81, 12, 90, 3]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    # The tokenizer's "[CLS] prompt [SEP]"; generate swaps [CLS] for [DEC] and drops the [SEP].
    prompt_ids = torch.tensor([[CLS, 14, 27, 8, SEP]])
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        logits = out.logits
        # The captioning trainer's loss: label smoothing 0.1 over the same shifted targets.
        smoothed = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        gen = dict(do_sample=False, num_beams=1, max_new_tokens=10, min_new_tokens=3)
        generated = model.generate(pixel_values=pixel_values, **gen)
        prompted = model.generate(
            pixel_values=pixel_values, input_ids=prompt_ids.repeat(2, 1).clone(), **gen
        )
        free = model.generate(pixel_values=pixel_values, do_sample=False, num_beams=1, max_new_tokens=12)
    print("generated", generated.tolist())
    print("prompted", prompted.tolist())
    print("free", free.tolist())
    save(
        model,
        "blip-tiny-caption",
        {
            "pixel_values": pixel_values,
            "image_embeds": image_embeds,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "logits": logits,
            "lm_loss": out.loss.reshape(1),
            "lm_loss_smoothed": smoothed.reshape(1),
            "prompt_ids": prompt_ids,
            "generated": generated,
            "generated_with_prompt": prompted,
            "generated_no_min": free,
        },
    )


def make_itm():
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config()).eval()
    randomise(model, 3)
    pixel_values = pixels(4, 3)
    input_ids = torch.tensor(
        [[CLS, 5, 17, 33, 60, 7, SEP], [CLS, 44, 9, 81, SEP, 0, 0], [CLS, 70, 71, SEP, 0, 0, 0]]
    )
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        itm = model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_itm_head=True
        ).itm_score
        itc = model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_itm_head=False
        ).itm_score
    save(
        model,
        "blip-tiny-itm",
        {
            "pixel_values": pixel_values,
            "image_embeds": image_embeds,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "itm_logits": itm,
            "itc_scores": itc,
        },
    )


if __name__ == "__main__":
    make_caption()
    make_itm()
    for name in ["blip-tiny-caption", "blip-tiny-itm"]:
        with open(os.path.join(OUT, name, "config.json")) as f:
            assert json.load(f)["model_type"] == "blip"
