"""Scaled dot-product attention, the call every backbone attention makes (Swin windows, SPA
containers, ViT, PVT). torch's fused kernel, except on a CPU in bf16 / fp16 with few keys:
there two matrix products around a softmax run about 2x faster (they use the AMX units; the
CPU fused kernel's small blocks do not), while with thousands of keys the fused kernel wins
by not materialising the scores (`python tools/benchmark.py --component attention`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WRITTEN_OUT_MAX_KEYS = 1024  # above: the fused kernel, also in bf16 (ViT's 4,000 keys: 157 vs 199 ms)


def written_out(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with F.scaled_dot_product_attention's arguments:
    q (..., L, d), k / v (..., S, d); mask broadcastable to (..., L, S), bool (True: attend)
    or added to the scores. In bf16 the scores are rounded before the softmax, where the fused
    kernel keeps them in fp32: its error against fp32 is about 1.5x the fused kernel's."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        bool_mask = mask.dtype == torch.bool
        scores = scores.masked_fill(~mask, float("-inf")) if bool_mask else scores + mask.to(scores.dtype)
    probs = scores.softmax(-1)
    if mask is not None and bool_mask:
        probs = probs.nan_to_num(0.0)  # a query with no key: zeros, as the fused kernel gives
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), by the
    faster of the two forms for the device, dtype and key count (see the module)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] <= WRITTEN_OUT_MAX_KEYS:
        return written_out(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
