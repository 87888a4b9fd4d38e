#!/usr/bin/env python3
"""Tiny GGUF checkpoints of the tiny Llama fixture, and HF's reference outputs for them.

    /tmp/ref/bin/python scripts/make_gguf_fixtures.py

Reads tests/fixtures/llama-tiny/ (run make_llm_fixtures.py first) and writes, under
tests/fixtures/gguf/, with the `gguf` package (gguf-py, llama.cpp's own writer):

- llama-tiny-{f32,q8_0,q4_0}-{gpt2,llama}.gguf: the same weights in F32, Q8_0 and Q4_0 (norms
  stay F32, as llama.cpp's converter leaves 1-D tensors), q and k rows permuted for llama.cpp's
  RoPE layout as `convert_hf_to_gguf.py` does, and one of two tokenizers:
  - gpt2: the fixture's byte-level BPE (`tokens`, `merges`, `tokenizer.ggml.pre` default);
  - llama: a SentencePiece-style vocabulary (`tokens`, `scores`, byte pieces <0x00>..<0xFF>,
    no merges), built here from the fixture corpus.
  Each carries a chat template (ChatML for gpt2, a Llama-2 [INST] one for llama). RoPE is
  plain (no llama3 scaling: GGUF would carry it as a `rope_freqs` tensor).
- reference.json: for each file, HF `from_pretrained(dir, gguf_file=...)`'s (dequantized, f32)
  logits of `input_ids` flattened, and its greedy ids for `prompt`; for each tokenizer kind,
  HF `AutoTokenizer.from_pretrained(dir, gguf_file=...)`'s ids of STRINGS with
  `add_special_tokens=False`, and `apply_chat_template(add_generation_prompt=True)` ids for
  CONVERSATIONS.

transformers 4.57.1, tokenizers 0.22.2 and gguf 0.19.0 are pinned.
"""

import json
import os

import gguf
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

PINNED = {"transformers": "4.57.1", "tokenizers": "0.22.2"}
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "tests", "fixtures", "llama-tiny")
OUT = os.path.join(HERE, "..", "tests", "fixtures", "gguf")

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('Conversation roles must be system, user or assistant') }}"
    "{% endif %}{% endfor %}"
)

STRINGS = [
    "the cat sat on the mat",
    "The Cat Sat On The Mat.",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\r\n",
    "multiple\n\n\nblank lines",
    "12345 67890",
    "3.14159 and 2,718",
    "x = 1000000",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "fn main() { println!(\"{}\", 42); }",
    "<html><body class=\"x\">hi</body></html>",
    "naïve café résumé",
    "日本語のテキスト",
    "emoji 🙂🚀 and ❤️",
    "Ünïcödé ßtraße",
    "¿Qué tal? ¡Bien!",
    "don't won't it's we're they've I'm you'll he'd",
    "a small red circle is on the left of the large blue square.",
    "speculative decoding drafts several tokens",
    "quick brown fox\u00a0non-breaking",
    "",
    " ",
    "     ",
    "a",
    "zzzzzzzzzzzzzzzzzzzz",
    "MiXeD CaSe 123abc ABC123",
    "email@example.com https://example.org/path?q=1",
    "<s> and </s> inside text",
    "<|im_start|>user\nhello<|im_end|>",
    "$$ \\frac{a}{b} $$ % # @ ! ~ ` ^",
    "the\u2581cat",
    "line one\nline two\n\tindented",
]

CONVERSATIONS = [
    [{"role": "user", "content": "the cat sat on"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "what is on the mat?"},
    ],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "tell me about the dog"},
    ],
    [{"role": "user", "content": "  spaces around  "}],
    [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "1 2 3"},
        {"role": "assistant", "content": "4 5 6"},
        {"role": "user", "content": "naïve café"},
    ],
]

PROMPT = "the cat sat on"


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split RoPE rows to interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg):
    hf = load_file(os.path.join(SRC, "model.safetensors"))
    h, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[f"blk.{i}.attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[f"blk.{i}.attn_q.weight"] = permute(hf[p + "self_attn.q_proj.weight"], h)
        out[f"blk.{i}.attn_k.weight"] = permute(hf[p + "self_attn.k_proj.weight"], hkv)
        out[f"blk.{i}.attn_v.weight"] = hf[p + "self_attn.v_proj.weight"]
        out[f"blk.{i}.attn_output.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[f"blk.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[f"blk.{i}.ffn_gate.weight"] = hf[p + "mlp.gate_proj.weight"]
        out[f"blk.{i}.ffn_up.weight"] = hf[p + "mlp.up_proj.weight"]
        out[f"blk.{i}.ffn_down.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


def gpt2_vocab():
    tok = json.load(open(os.path.join(SRC, "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["id"] for a in tok["added_tokens"]}
    types = [3 if i in special else 1 for i in range(len(tokens))]
    return tokens, types, merges


def spm_vocab(size, corpus):
    """<unk>, <s>, </s>, the 256 byte pieces, then single characters and word prefixes of
    the corpus (`▁`-prefixed), scored so that shorter pieces merge first."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    words = []
    for line in corpus:
        for w in line.split():
            words.append("\u2581" + w)
    chars = sorted({c for w in words for c in w})
    pieces = list(chars)
    for length in range(2, 12):
        for w in words:
            p = w[:length]
            if len(p) == length and p not in pieces:
                pieces.append(p)
    pieces = pieces[: size - len(tokens)]
    for rank, p in enumerate(pieces):
        tokens.append(p)
        types.append(1)
        scores.append(-float(rank))
    assert len(tokens) == size, len(tokens)
    return tokens, types, scores


def write(path, cfg, tensors, qtype, kind):
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("llama-tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    if kind == "gpt2":
        tokens, types, merges = gpt2_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_chat_template(CHATML)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
    else:
        from make_llm_fixtures import CORPUS

        tokens, types, scores = spm_vocab(cfg["vocab_size"], CORPUS)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_chat_template(LLAMA2)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    for pkg, version in PINNED.items():
        found = __import__(pkg).__version__
        if found != version:
            raise SystemExit(f"{pkg} {version} is pinned, found {found}")
    import sys

    sys.path.insert(0, HERE)
    os.makedirs(OUT, exist_ok=True)
    cfg = json.load(open(os.path.join(SRC, "config.json")))
    tensors = gguf_tensors(cfg)
    ref = load_file(os.path.join(SRC, "reference.safetensors"))
    input_ids = torch.from_numpy(ref["input_ids"].astype(np.int64))
    reference = {"input_ids": input_ids.tolist(), "files": {}, "tokenizers": {}}
    qtypes = {
        "f32": gguf.GGMLQuantizationType.F32,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }
    for kind in ["gpt2", "llama"]:
        for qname, qtype in qtypes.items():
            name = f"llama-tiny-{qname}-{kind}.gguf"
            write(os.path.join(OUT, name), cfg, tensors, qtype, kind)
            tok = transformers.AutoTokenizer.from_pretrained(OUT, gguf_file=name)
            # HF 4.57's GGUF converter sets eos_token to the bos token's text
            # (`GGUFLlamaConverter.tokenizer`); templates need the real one.
            tok.eos_token = tok.convert_ids_to_tokens(2)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                OUT, gguf_file=name, torch_dtype=torch.float32
            ).eval()
            # The prompt as llama.cpp tokenizes it: bos only where add_bos_token says.
            prompt = tok(PROMPT, add_special_tokens=False).input_ids
            if kind == "llama":
                prompt = [1] + prompt
            with torch.no_grad():
                logits = model(input_ids=input_ids).logits
                generated = model.generate(
                    input_ids=torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=20,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            reference["files"][name] = {
                "logits_shape": list(logits.shape),
                "logits": [round(float(x), 7) for x in logits.flatten()],
                "prompt": prompt,
                "generated": generated[0].tolist(),
            }
            if kind not in reference["tokenizers"]:
                reference["tokenizers"][kind] = {
                    "file": name,
                    "strings": [
                        {"text": s, "ids": tok(s, add_special_tokens=False).input_ids}
                        for s in STRINGS
                    ],
                    "chats": [
                        {
                            "messages": c,
                            "ids": tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True),
                        }
                        for c in CONVERSATIONS
                    ],
                }
            print(name, "generated", generated[0].tolist())
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(reference, f, ensure_ascii=False, indent=0)


if __name__ == "__main__":
    main()
