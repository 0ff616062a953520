"""Attention of one new token over a static K/V cache: SDPA, or split-KV (flash-decoding) FlexAttention.

With a single query row, SDPA's kernels parallelise over batch x heads only, so a long cache is read by
a few dozen thread blocks (measured on an H200: about 0.2 TB/s at 100K tokens). Flash-decoding splits
the keys into chunks, attends to each in parallel and merges the chunks' partial softmaxes by their
log-sum-exp; PyTorch's FlexAttention selects such a decoding kernel for short queries when compiled
(``torch.nn.attention.flex_attention``; Tri Dao et al., "Flash-Decoding for long-context inference",
2023). The valid-column mask enters as a ``score_mod`` (-inf where a column holds no token), read at
run time, so one compiled kernel serves every step of a static cache.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SPLIT_KV_MIN_HEAD_DIM", "decode_attention", "split_kv_supported"]

SPLIT_KV_MIN_HEAD_DIM = 16
"""The smallest head dimension FlexAttention's compiled CUDA kernels accept (Inductor's flex_attention
lowering raises NotImplementedError below it)."""


def split_kv_supported(device: torch.device, head_dim: int) -> bool:
    """Whether split-KV attention can run for heads of ``head_dim`` on ``device``: off CUDA always
    (eager FlexAttention), on CUDA from ``SPLIT_KV_MIN_HEAD_DIM``."""
    return device.type != "cuda" or head_dim >= SPLIT_KV_MIN_HEAD_DIM


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    """FlexAttention compiled once per process, with dynamic shapes (one kernel for every cache length)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float, split_kv: bool) -> Tensor:
    """Attention output (B, H, 1, Dh) of queries q (B, H, 1, Dh) over keys and values (B, H_kv, T, Dh),
    column t of row b attended iff ``valid[b, t]`` ((B, T) bool; each row needs one valid column).

    Grouped-query attention: query head h reads K/V head h // (H / H_kv). ``split_kv=False``: SDPA on
    the (B, H_kv, H / H_kv, Dh) view of q with the column mask, no K/V repeated. ``split_kv=True``:
    FlexAttention, compiled on CUDA (eager elsewhere: the reference semantics, slow). Raises
    ValueError when H is not a multiple of H_kv, or for split-KV on CUDA with Dh below
    ``SPLIT_KV_MIN_HEAD_DIM``.
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    if split_kv and not split_kv_supported(q.device, head_dim):
        raise ValueError(f"split-KV attention on CUDA needs a head dimension of at least {SPLIT_KV_MIN_HEAD_DIM}, "
                         f"got {head_dim}")
    if not split_kv:
        grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=valid[:, None, None, :], scale=scale)
        return out.reshape(batch, heads, 1, head_dim)

    def mask_invalid(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.where(valid[b, kv_idx], score, -float("inf"))

    if q.is_cuda:
        return _compiled_flex_attention()(q, keys, values, score_mod=mask_invalid, scale=scale, enable_gqa=True)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # "flex_attention called without torch.compile": intended off CUDA
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, keys, values, score_mod=mask_invalid, scale=scale, enable_gqa=True)
