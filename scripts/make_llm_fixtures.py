#!/usr/bin/env python3
"""Tiny random Llama-family checkpoints and reference outputs for the LLM parity tests.

    /tmp/ref/bin/python scripts/make_llm_fixtures.py

Writes, under tests/fixtures/:

- llama-tiny/: `LlamaForCausalLM`, grouped-query attention (4 query heads, 2 key/value heads),
  llama3 `rope_scaling`, untied embeddings.
- qwen2-tiny/: `Qwen2ForCausalLM`, the Qwen2 layout (q/k/v biases, no o_proj bias), tied
  embeddings, linear `rope_scaling`.

Each folder holds the HF checkpoint and `reference.safetensors`: `input_ids` [2, 12], the
`last_hidden_state` and `logits` of every position, and `generated`, HF `generate`'s greedy
output for `prompt` (20 new tokens, no eos stop).

Both share a byte-level BPE tokenizer trained here on a few sentences (`tokenizer.json`, with
`<pad>` 0, `<s>` 1, `</s>` 2), and `cli_reference.json` holds HF `generate`'s greedy ids for a
text prompt tokenized by it, for the `zoo generate` test.

- rope_scaling.safetensors: HF's inverse frequencies (and attention factors) for every
  `rope_type` (default, linear, dynamic at several sequence lengths, llama3, yarn), from
  `ROPE_INIT_FUNCTIONS`.
"""

import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

PINNED_TRANSFORMERS = "4.57.1"
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


CORPUS = [
    "the cat sat on the mat and looked at the dog.",
    "a small red circle is on the left of the large blue square.",
    "speculative decoding drafts several tokens and verifies them at once.",
    "the quick brown fox jumps over the lazy dog.",
    "models that read and write text predict one token after another.",
] * 20

CLI_PROMPT = "the cat sat on"


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make(name, cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    folder = os.path.join(OUT, name)
    model.save_pretrained(folder, safe_serialization=True)
    tok = tokenizer()
    tok.save_pretrained(folder)
    prompt_ids = tok(CLI_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        cli = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=12,
            do_sample=False,
        )
    with open(os.path.join(folder, "cli_reference.json"), "w") as f:
        json.dump({"prompt": CLI_PROMPT, "max_new_tokens": 12, "token_ids": cli[0].tolist()}, f)
    ids = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        hidden = model.model(input_ids=ids).last_hidden_state
        prompt = ids[:1, :5]
        generated = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    save_file(
        {
            "input_ids": ids.contiguous(),
            "last_hidden_state": hidden.contiguous(),
            "logits": out.logits.contiguous(),
            "prompt": prompt.clone().contiguous(),
            "generated": generated.contiguous(),
        },
        os.path.join(folder, "reference.safetensors"),
    )
    print(name, "generated", generated.tolist())


def rope_references():
    tensors = {}
    base = dict(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=64,
        rope_theta=10000.0,
    )
    cases = {
        "default": None,
        "linear": {"rope_type": "linear", "factor": 4.0},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "llama3": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        "yarn_mscale": {
            "rope_type": "yarn",
            "factor": 4.0,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
        },
    }
    for key, scaling in cases.items():
        config = transformers.LlamaConfig(**base, rope_scaling=scaling)
        kind = "default" if scaling is None else scaling["rope_type"]
        fn = ROPE_INIT_FUNCTIONS[kind]
        lengths = [None, 40, 64, 100, 300] if kind == "dynamic" else [None]
        for seq_len in lengths:
            inv_freq, factor = fn(config, "cpu", seq_len=seq_len)
            suffix = "" if seq_len is None else f"_{seq_len}"
            tensors[f"{key}{suffix}.inv_freq"] = inv_freq.float().contiguous()
            tensors[f"{key}{suffix}.attention_factor"] = torch.tensor([float(factor)])
    save_file(tensors, os.path.join(OUT, "rope_scaling.safetensors"))


def main():
    if transformers.__version__ != PINNED_TRANSFORMERS:
        raise SystemExit(f"transformers {PINNED_TRANSFORMERS} is pinned, found {transformers.__version__}")
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    make(
        "llama-tiny",
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(
            **common,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    )
    make(
        "qwen2-tiny",
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config(
            **common,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            use_sliding_window=False,
        ),
    )
    rope_references()


if __name__ == "__main__":
    main()
