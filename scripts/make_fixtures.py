#!/usr/bin/env python3
"""Make the tiny HF reference checkpoints and outputs the Rust tests compare against.

Run from the repository root (CI never runs this; the outputs are committed):

    python3 -m venv /tmp/ref
    /tmp/ref/bin/pip install torch transformers==4.57.1 safetensors pillow==13.0.0 \
        scikit-image tokenizers==0.22.2 open_clip_torch
    /tmp/ref/bin/python scripts/make_fixtures.py

Writes under tests/fixtures/:
  clip-tiny-argmax/    CLIPModel, quick_gelu, legacy eos_token_id == 2 (argmax pooling), 32 px
  clip-tiny-eos/       CLIPModel, gelu, real eos id (first-eos pooling), 48 px, sharded weights
  siglip-tiny/         SiglipModel, gelu_pytorch_tanh, 32 px, text padded to max length
      each with config.json, model.safetensors (or shards + index), tokenizer.json,
      tokenizer_config.json, preprocessor_config.json and reference.safetensors
  images/              the real photos (scikit-image) and odd-format variants
  preprocess/          HF image-processor outputs on those photos (f16)
  rope.safetensors     HF apply_rotary_pos_emb on random q, k
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PINNED_TRANSFORMERS = "4.57.1"
if transformers.__version__ != PINNED_TRANSFORMERS:
    sys.exit(f"transformers {transformers.__version__} found; the fixtures are pinned to {PINNED_TRANSFORMERS}")

from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizerFast,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures")
SKIMAGE_DATA = os.path.join(os.path.dirname(__import__("skimage").__file__), "data")

TEXTS = [
    "a photo of a cat",
    "an astronaut in a white suit",
    "two dogs playing in the snow on a sunny day",
    "red",
]

CORPUS = [
    "a photo of a cat", "a photo of a dog", "an astronaut in a white suit", "a red car on the road",
    "two dogs playing in the snow on a sunny day", "a small red circle on the left",
    "a big blue square on the right", "a green triangle in the middle", "the cat sits on the mat",
    "a picture of a person riding a horse", "an orange cat sleeping on a sofa",
] + [f"a {size} {colour} {shape} on the {where}" for size in ["small", "large", "tiny"]
     for colour in ["red", "green", "blue", "yellow"] for shape in ["circle", "square", "photo", "dog"]
     for where in ["left", "right", "top"]]


def clip_like_tokenizer(vocab_size, post):
    """A small byte-level BPE with CLIP's normalizer, pre-tokenizer and `</w>` suffix."""
    tok = Tokenizer(models.BPE(unk_token=None, end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    tok.decoder = decoders.ByteLevel()
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = post(bos, eos)
    return tok, bos, eos


def clip_post(bos, eos):
    return processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )


def eos_only_post(bos, eos):
    return processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)])


def save_tiny(name, model, tokenizer, image_processor, padding, max_shard_size=None):
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    model.eval()
    if max_shard_size:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    # Only tokenizer.json, tokenizer_config.json and special_tokens_map.json are needed.
    for extra in ["vocab.json", "merges.txt"]:
        path = os.path.join(out, extra)
        if os.path.exists(path):
            os.remove(path)

    images = [Image.open(os.path.join(OUT, "images", f)) for f in ["astronaut.png", "chelsea.png"]]
    pixel = image_processor(images=images, return_tensors="pt")["pixel_values"]
    enc = tokenizer(TEXTS, padding=padding, truncation=True, return_tensors="pt")
    with torch.no_grad():
        attn = enc["attention_mask"] if padding is True else None
        out_ = model(input_ids=enc["input_ids"], attention_mask=attn, pixel_values=pixel)
        text_features = model.get_text_features(input_ids=enc["input_ids"], attention_mask=attn)
        image_features = model.get_image_features(pixel_values=pixel)
    ref = {
        "pixel_values": pixel.float().contiguous(),
        "input_ids": enc["input_ids"].long().contiguous(),
        "attention_mask": enc["attention_mask"].long().contiguous(),
        "text_features": text_features.contiguous(),
        "image_features": image_features.contiguous(),
        "text_embeds": out_.text_embeds.contiguous(),
        "image_embeds": out_.image_embeds.contiguous(),
        "logits_per_image": out_.logits_per_image.contiguous(),
    }
    save_file(ref, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "reference_texts.json"), "w") as f:
        json.dump({"texts": TEXTS, "images": ["../images/astronaut.png", "../images/chelsea.png"],
                   "text_padding": "longest" if padding is True else padding}, f, indent=1)


def make_clip_fixtures():
    torch.manual_seed(0)
    tok_dir = os.path.join(OUT, "_tok")
    os.makedirs(tok_dir, exist_ok=True)
    raw, bos, eos = clip_like_tokenizer(400, clip_post)
    raw.save(os.path.join(tok_dir, "tokenizer.json"))
    tokenizer = CLIPTokenizerFast(
        tokenizer_file=os.path.join(tok_dir, "tokenizer.json"),
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=24,
    )
    shutil.rmtree(tok_dir)
    vocab = len(tokenizer)

    def text_cfg(eos_id, act):
        return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, projection_dim=24,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                    hidden_act=act, bos_token_id=bos, eos_token_id=eos_id, pad_token_id=eos)

    def vision_cfg(size, patch, act):
        return dict(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2,
                    num_attention_heads=4, image_size=size, patch_size=patch, hidden_act=act)

    # The legacy config (eos_token_id 2) pools with argmax(input_ids); eos is the highest id here,
    # as in the real vocabulary.
    cfg = CLIPConfig(text_config=text_cfg(2, "quick_gelu"), vision_config=vision_cfg(32, 8, "quick_gelu"),
                     projection_dim=24)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    save_tiny("clip-tiny-argmax", CLIPModel(cfg), tokenizer, proc, padding=True)

    cfg = CLIPConfig(text_config=text_cfg(eos, "gelu"), vision_config=vision_cfg(48, 16, "gelu"), projection_dim=24)
    proc = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, resample=2)
    save_tiny("clip-tiny-eos", CLIPModel(cfg), tokenizer, proc, padding=True, max_shard_size="100KB")


def make_siglip_fixture():
    torch.manual_seed(1)
    tok_dir = os.path.join(OUT, "_tok")
    os.makedirs(tok_dir, exist_ok=True)
    raw, bos, eos = clip_like_tokenizer(400, eos_only_post)
    raw.save(os.path.join(tok_dir, "tokenizer.json"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tok_dir, "tokenizer.json"),
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=24,
    )
    shutil.rmtree(tok_dir)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, pad_token_id=eos,
                         bos_token_id=bos, eos_token_id=eos, projection_size=24),
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
    )
    model = SiglipModel(cfg)
    with torch.no_grad():  # SigLIP's init sets the scale and bias to constants; make them non-trivial.
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-3.0)
    proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    save_tiny("siglip-tiny", model, tokenizer, proc, padding="max_length")


def make_images():
    out = os.path.join(OUT, "images")
    os.makedirs(out, exist_ok=True)
    for f in ["astronaut.png", "chelsea.png"]:
        shutil.copy(os.path.join(SKIMAGE_DATA, f), os.path.join(out, f))
    cat = Image.open(os.path.join(SKIMAGE_DATA, "chelsea.png")).convert("RGB").resize((90, 60), Image.BICUBIC)
    cat.save(os.path.join(out, "small.png"))
    cat.convert("L").save(os.path.join(out, "gray.png"))
    rgba = cat.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(cat.size))
    rgba.save(os.path.join(out, "rgba.png"))
    gray16 = (np.asarray(cat.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(os.path.join(out, "gray16.png"))
    cat.convert("CMYK").save(os.path.join(out, "cmyk.jpg"), quality=95)
    with open(os.path.join(out, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")


def make_preprocess_references():
    out = os.path.join(OUT, "preprocess")
    os.makedirs(out, exist_ok=True)
    processors_ = {
        "clip224": CLIPImageProcessor(),  # shortest_edge 224, bicubic, center crop 224
        "siglip224": SiglipImageProcessor(),  # 224x224, bicubic, no crop
        "bilinear": CLIPImageProcessor(size={"shortest_edge": 160}, crop_size={"height": 128, "width": 144},
                                       resample=2),
    }
    names = ["astronaut.png", "chelsea.png"]
    odd = ["gray.png", "rgba.png", "cmyk.jpg", "small.png"]
    for key, proc in processors_.items():
        proc.save_pretrained(os.path.join(out, key))
        tensors = {}
        for n in names + (odd if key == "clip224" else []):
            img = Image.open(os.path.join(OUT, "images", n))
            pv = proc(images=img, return_tensors="pt")["pixel_values"][0]
            tensors[n] = pv.to(torch.float16).contiguous()
        save_file(tensors, os.path.join(out, key, "reference.safetensors"))


def make_rope_reference():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    from transformers import LlamaConfig

    torch.manual_seed(2)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=64, rope_theta=10000.0)
    rope = LlamaRotaryEmbedding(cfg)
    q = torch.randn(1, 2, 6, 16)
    k = torch.randn(1, 2, 6, 16)
    position_ids = torch.tensor([[0, 1, 2, 7, 8, 33]])
    cos, sin = rope(q, position_ids)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    save_file({"q": q, "k": k, "position_ids": position_ids[0].to(torch.int64), "q_rot": q_rot.contiguous(),
               "k_rot": k_rot.contiguous()}, os.path.join(OUT, "rope.safetensors"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    make_images()
    make_clip_fixtures()
    make_siglip_fixture()
    make_preprocess_references()
    make_rope_reference()
    print("fixtures written to", os.path.normpath(OUT))
