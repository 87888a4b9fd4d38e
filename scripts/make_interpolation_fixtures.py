#!/usr/bin/env python3
"""HF vision outputs at image sizes other than the checkpoint's, with
`interpolate_pos_encoding=True` (bicubic resampling of the learned position table), for the
tiny CLIP, SigLIP and BLIP fixtures. Run after scripts/make_fixtures.py and
scripts/make_blip_fixtures.py:

    /tmp/ref/bin/python scripts/make_interpolation_fixtures.py
    # writes tests/fixtures/interpolate_pos.safetensors
"""

import os
import sys

import torch
import transformers
from safetensors.torch import save_file

if transformers.__version__ != "4.57.1":
    sys.exit(f"transformers {transformers.__version__} found; the fixtures are pinned to 4.57.1")

from transformers import BlipForConditionalGeneration, CLIPModel, SiglipModel  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

torch.manual_seed(0)
out = {}
# (fixture, class, sizes (H, W)): larger, smaller-but-nonsquare, and the trained size.
cases = [
    ("clip-tiny-eos", CLIPModel, [(64, 64), (48, 80), (48, 48)]),
    ("siglip-tiny", SiglipModel, [(48, 48), (24, 40), (32, 32)]),
    ("blip-tiny-caption", BlipForConditionalGeneration, [(48, 48), (40, 24), (32, 32)]),
]
for name, cls, sizes in cases:
    model = cls.from_pretrained(os.path.join(ROOT, name)).eval()
    for h, w in sizes:
        pixels = torch.randn(1, 3, h, w)
        with torch.no_grad():
            vision = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
        key = f"{name}.{h}x{w}"
        out[f"{key}.pixel_values"] = pixels
        out[f"{key}.last_hidden_state"] = vision.last_hidden_state
        out[f"{key}.pooler_output"] = vision.pooler_output

save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "interpolate_pos.safetensors"))
print(f"wrote {len(out)} tensors")
