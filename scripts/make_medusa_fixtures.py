#!/usr/bin/env python3
"""Medusa fixtures: FasterDecoding's tree buffers for `mc_sim_7b_63`, and random Medusa heads for
the tiny Llama.

    git clone https://github.com/FasterDecoding/Medusa /tmp/Medusa   # at e2a5d20
    /tmp/ref/bin/python scripts/make_medusa_fixtures.py /tmp/Medusa

The PyPI package medusa-llm (0.1) predates tree choices (its `generate_medusa_buffers` takes a
top-k per head), so the buffers come from the GitHub repository's `medusa/model/utils.py` and
`medusa_choices.py`, imported from the checkout given on the command line; none of its code is
copied here. Writes:

- tests/fixtures/medusa_buffers.json: the choices and `medusa_attn_mask`, `tree_indices`,
  `medusa_position_ids`, `retrieve_indices` as `generate_medusa_buffers` returns them.
- tests/fixtures/llama-tiny-medusa/: 4 random heads of 1 ResBlock for llama-tiny in
  FasterDecoding's layout (`{i}.0.linear.weight/bias`, `{i}.1.weight`), as
  `medusa_lm_head.safetensors` and `medusa_lm_head.pt`, with `config.json`.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def main(checkout):
    sys.path.insert(0, checkout)
    from medusa.model.medusa_choices import mc_sim_7b_63
    from medusa.model.utils import generate_medusa_buffers

    buffers = generate_medusa_buffers(mc_sim_7b_63, device="cpu")
    with open(os.path.join(OUT, "medusa_buffers.json"), "w") as f:
        json.dump(
            {
                "choices": mc_sim_7b_63,
                "medusa_attn_mask": buffers["medusa_attn_mask"][0, 0].int().tolist(),
                "tree_indices": buffers["tree_indices"].tolist(),
                "medusa_position_ids": buffers["medusa_position_ids"].tolist(),
                "retrieve_indices": buffers["retrieve_indices"].tolist(),
            },
            f,
        )

    hidden, vocab, heads, layers = 64, 320, 4, 1
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(heads):
        for j in range(layers):
            state[f"{i}.{j}.linear.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.1
            state[f"{i}.{j}.linear.bias"] = torch.randn(hidden, generator=gen) * 0.1
        state[f"{i}.{layers}.weight"] = torch.randn(vocab, hidden, generator=gen) * 0.1
    folder = os.path.join(OUT, "llama-tiny-medusa")
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "medusa_lm_head.safetensors"))
    torch.save(state, os.path.join(folder, "medusa_lm_head.pt"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(
            {"medusa_num_heads": heads, "medusa_num_layers": layers, "base_model_name_or_path": "llama-tiny"},
            f,
            indent=2,
        )


if __name__ == "__main__":
    main(sys.argv[1])
