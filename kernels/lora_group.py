"""PLACEHOLDER — being replaced by the fused Triton kernel (issue 2). Reference math only."""
from typing import Optional, Sequence

import torch


def lora_group_reference(x, weight, bias, As, Bs, scales):
    """y = x Wᵀ + b + (x A_catᵀ ⊙ s_rep) B_catᵀ  — one shrink, one expand."""
    y = torch.nn.functional.linear(x, weight, bias)
    if len(As) == 0:
        return y
    A_cat = torch.cat(list(As), 0)
    B_cat = torch.cat(list(Bs), 1)
    s_rep = torch.cat([torch.full((a.shape[0],), float(s), dtype=x.dtype, device=x.device) for a, s in zip(As, scales)])
    h = torch.nn.functional.linear(x, A_cat) * s_rep
    return y + torch.nn.functional.linear(h, B_cat)


def lora_group_linear(x, weight, bias, As, Bs, scales):
    return lora_group_reference(x, weight, bias, As, Bs, scales)
