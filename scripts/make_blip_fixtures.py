#!/usr/bin/env python3
"""Make the BLIP reference checkpoints and outputs that models/tests/blip.rs compares against.

Run from the repository root (CI never runs this; the outputs are committed):

    python3 -m venv /tmp/ref
    /tmp/ref/bin/pip install torch transformers==4.57.1 tokenizers==0.22.2 safetensors
    /tmp/ref/bin/python scripts/make_blip_fixtures.py

Writes under tests/fixtures/:
  blip-tiny-caption/  BlipForConditionalGeneration with random weights: the vision tower's
                      `last_hidden_state` (after post_layernorm), decoder logits and LM loss
                      (plain and with label smoothing 0.1) for given input_ids; `generate`
                      outputs: greedy, beam search (3 beams, with and without a prompt, and with a
                      length penalty), and greedy with a repetition penalty
  blip-tiny-itm/      BlipForImageTextRetrieval with random weights: ITM logits
                      (`use_itm_head=True`) and ITC scores (`use_itm_head=False`) for a padded
                      batch of texts
      each with config.json, model.safetensors and reference.safetensors, a WordPiece tokenizer
      laid out as Salesforce/blip-image-captioning-base's (tokenizer.json, tokenizer_config.json,
      special_tokens_map.json, vocab.txt: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103,
      bos [DEC] 110, [ENC] 111) and a BlipImageProcessor preprocessor_config.json; and
      cli_reference.json: what `zoo caption` / `zoo match` must print for images from
      tests/fixtures/images, run through HF's BlipProcessor
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

from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
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
IMAGES = ["astronaut.png", "chelsea.png", "gray.png"]
PROMPT = "A picture of"

# The 120-token WordPiece vocabulary: BERT's special tokens at BERT's ids, BLIP's [DEC] at the
# config's bos id and [ENC] after it (as salesforce/BLIP's `init_tokenizer` adds them), and
# words plus single letters so that any lowercase ASCII text has a tokenization.
WORDS = (
    "a picture of the an in on with and is are two cat dog man woman person sitting standing "
    "on top red blue green white black small large photo image street car table room water "
    "grass sky tree house people group near next to holding front field white "
    "astronaut space suit flag"
).split()


def vocab():
    tokens = ["[PAD]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pool = list(dict.fromkeys(letters + ["##" + c for c in letters] + WORDS + [".", ",", "'", "-"]))
    specials = {100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 110: "[DEC]", 111: "[ENC]"}
    pool = iter(pool)
    for i in range(1, TEXT["vocab_size"]):
        tokens.append(specials[i] if i in specials else next(pool, f"[unused{i}]"))
    return tokens


def processor(path):
    """Saves a BlipProcessor (tokenizer + image processor) into `path`, as the hub repos have it."""
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab()) + "\n")
    tok = BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True, model_max_length=TEXT["max_position_embeddings"])
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert tok.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", "[DEC]"]) == [0, CLS, SEP, TEXT["bos_token_id"]]
    assert len(tok) == TEXT["vocab_size"], len(tok)
    images = BlipImageProcessor(size={"height": VISION["image_size"], "width": VISION["image_size"]})
    proc = BlipProcessor(image_processor=images, tokenizer=tok)
    proc.save_pretrained(path)
    return BlipProcessor.from_pretrained(path)


def load_images():
    root = os.path.join(OUT, "images")
    return [Image.open(os.path.join(root, name)) for name in IMAGES]


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
        beam = dict(do_sample=False, num_beams=3, max_new_tokens=10, min_new_tokens=2)
        beams = model.generate(pixel_values=pixel_values, **beam)
        beams_prompted = model.generate(pixel_values=pixel_values, input_ids=prompt_ids.repeat(2, 1).clone(), **beam)
        beams_long = model.generate(
            pixel_values=pixel_values, do_sample=False, num_beams=4, max_new_tokens=14, length_penalty=2.0
        )
        beams_short = model.generate(
            pixel_values=pixel_values, do_sample=False, num_beams=3, max_new_tokens=14, length_penalty=-1.0
        )
        repetition = model.generate(pixel_values=pixel_values, do_sample=False, max_new_tokens=12, repetition_penalty=1.8)
        beams_repetition = model.generate(
            pixel_values=pixel_values, do_sample=False, num_beams=3, max_new_tokens=12, repetition_penalty=1.8
        )
    for k, v in dict(
        generated=generated, prompted=prompted, free=free, beams=beams, beams_prompted=beams_prompted,
        beams_long=beams_long, beams_short=beams_short, repetition=repetition, beams_repetition=beams_repetition,
    ).items():
        print(k, v.tolist())
    path = os.path.join(OUT, "blip-tiny-caption")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    proc = processor(path)
    cli = caption_cli_reference(model, proc)
    with open(os.path.join(path, "cli_reference.json"), "w") as f:
        json.dump(cli, f, indent=1)
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
            "beams": beams,
            "beams_with_prompt": beams_prompted,
            "beams_length_penalty_2": beams_long,
            "beams_length_penalty_neg": beams_short,
            "repetition_penalty": repetition,
            "beams_repetition_penalty": beams_repetition,
        },
    )


def caption_cli_reference(model, proc):
    """HF's captions of real image files, as `zoo caption --json` must print them."""
    images = load_images()
    pixel_values = proc(images=images, return_tensors="pt").pixel_values
    prompt_ids = proc(text=[PROMPT] * len(images), return_tensors="pt").input_ids
    runs = {
        "greedy": dict(num_beams=1, max_new_tokens=8),
        "greedy_prompt": dict(num_beams=1, max_new_tokens=8, prompt=True),
        "beams": dict(num_beams=3, max_new_tokens=8, min_new_tokens=2),
        "beams_prompt": dict(num_beams=3, max_new_tokens=8, min_new_tokens=2, prompt=True),
    }
    out = {"images": IMAGES, "prompt": PROMPT}
    with torch.no_grad():
        for name, kw in runs.items():
            kw = dict(kw)
            prompted = kw.pop("prompt", False)
            ids = prompt_ids.clone() if prompted else None
            seqs = model.generate(pixel_values=pixel_values, input_ids=ids, do_sample=False, **kw)
            texts = proc.batch_decode(seqs, skip_special_tokens=True)
            if prompted:
                prompt_text = proc.decode(prompt_ids[0], skip_special_tokens=True)
                assert all(t.startswith(prompt_text) for t in texts), texts
                texts = [t[len(prompt_text):].strip() for t in texts]
            out[name] = {"options": kw, "token_ids": seqs.tolist(), "captions": texts}
    return out


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
    path = os.path.join(OUT, "blip-tiny-itm")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    proc = processor(path)
    with open(os.path.join(path, "cli_reference.json"), "w") as f:
        json.dump(match_cli_reference(model, proc), f, indent=1)
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


MATCH_TEXTS = ["a man in a space suit", "a cat sitting on a red table", "two dogs"]


def match_cli_reference(model, proc):
    """HF's ITM probability and ITC score of every (image, text) pair, as `zoo match --json`."""
    images = load_images()
    pixel_values = proc(images=images, return_tensors="pt").pixel_values
    text = proc(text=MATCH_TEXTS, padding=True, return_tensors="pt")
    pairs = []
    with torch.no_grad():
        itc = model(
            input_ids=text.input_ids, pixel_values=pixel_values, attention_mask=text.attention_mask, use_itm_head=False
        ).itm_score
        for i, image in enumerate(IMAGES):
            for j, caption in enumerate(MATCH_TEXTS):
                itm = model(
                    input_ids=text.input_ids[j : j + 1],
                    pixel_values=pixel_values[i : i + 1],
                    attention_mask=text.attention_mask[j : j + 1],
                    use_itm_head=True,
                ).itm_score
                prob = torch.softmax(itm, dim=1)[0, 1].item()
                pairs.append({"image": image, "text": caption, "itm_prob": prob, "itc_score": itc[i, j].item()})
    return {"images": IMAGES, "texts": MATCH_TEXTS, "pairs": pairs}


if __name__ == "__main__":
    make_caption()
    make_itm()
    for name in ["blip-tiny-caption", "blip-tiny-itm"]:
        with open(os.path.join(OUT, name, "config.json")) as f:
            assert json.load(f)["model_type"] == "blip"
