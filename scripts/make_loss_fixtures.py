#!/usr/bin/env python3
"""Reference values and gradients of open_clip's ClipLoss and SigLipLoss for the Rust loss tests.

    /tmp/ref/bin/pip install torch open_clip_torch==3.3.0 safetensors
    /tmp/ref/bin/python scripts/make_loss_fixtures.py   # writes tests/fixtures/losses.safetensors
"""

import os
import sys

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from safetensors.torch import save_file

if open_clip.__version__ != "3.3.0":
    sys.exit(f"open_clip {open_clip.__version__} found; pinned to 3.3.0")

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "losses.safetensors")

torch.manual_seed(0)
n, d = 6, 8
img = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)
txt = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)
out = {"image_embeds": img, "text_embeds": txt}

# CLIP: open_clip passes exp(logit_scale) to the loss.
img_c, txt_c = img.clone().requires_grad_(), txt.clone().requires_grad_()
scale = torch.tensor(2.659260036932778, dtype=torch.float64, requires_grad=True)
loss = ClipLoss()(img_c, txt_c, scale.exp())
loss.backward()
out.update(clip_loss=loss.detach().reshape(1), clip_grad_image=img_c.grad, clip_grad_text=txt_c.grad,
           clip_grad_scale=scale.grad.reshape(1))

# SigLIP with a larger scale and a bias, so the positives and negatives both matter.
img_s, txt_s = img.clone().requires_grad_(), txt.clone().requires_grad_()
scale = torch.tensor(2.302585092994046, dtype=torch.float64, requires_grad=True)
bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
loss = SigLipLoss()(img_s, txt_s, scale.exp(), bias)
loss.backward()
out.update(siglip_loss=loss.detach().reshape(1), siglip_grad_image=img_s.grad, siglip_grad_text=txt_s.grad,
           siglip_grad_scale=scale.grad.reshape(1), siglip_grad_bias=bias.grad.reshape(1))

save_file({k: v.contiguous() for k, v in out.items()}, OUT)
print("wrote", os.path.normpath(OUT))
