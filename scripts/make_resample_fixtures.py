#!/usr/bin/env python3
"""Reference outputs and input gradients of torch.nn.functional.interpolate (nearest, bilinear,
bicubic; align_corners both ways; up, down and mixed sizes) and of pixel_shuffle /
pixel_unshuffle, for the Rust resampling tests.

    /tmp/ref/bin/pip install torch safetensors
    /tmp/ref/bin/python scripts/make_resample_fixtures.py  # writes tests/fixtures/resample.safetensors
"""

import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

if not torch.__version__.startswith("2.15"):
    sys.exit(f"torch {torch.__version__} found; pinned to 2.15")

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "resample.safetensors")

torch.manual_seed(0)
x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
out = {"x": x}
SIZES = {"up": (9, 12), "down": (3, 4), "mixed": (8, 3), "same": (5, 7), "one": (1, 1)}
for mode, corners in [("nearest", None), ("bilinear", False), ("bilinear", True), ("bicubic", False), ("bicubic", True)]:
    for name, size in SIZES.items():
        xi = x.clone().requires_grad_()
        kw = {} if corners is None else {"align_corners": corners}
        y = F.interpolate(xi, size=size, mode=mode, **kw)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        key = f"{mode}.{name}" if corners is None else f"{mode}.{'corners' if corners else 'centers'}.{name}"
        out[f"{key}.out"] = y.detach()
        out[f"{key}.upstream"] = g
        out[f"{key}.grad"] = xi.grad

s = torch.randn(1, 8, 3, 4, dtype=torch.float64)
out["shuffle.in"] = s
out["shuffle.out"] = F.pixel_shuffle(s, 2)
u = torch.randn(1, 2, 6, 8, dtype=torch.float64)
out["unshuffle.in"] = u
out["unshuffle.out"] = F.pixel_unshuffle(u, 2)

save_file({k: v.contiguous() for k, v in out.items()}, OUT)
print(f"wrote {len(out)} tensors to {OUT}")
