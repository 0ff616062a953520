"""Attention of one new token over a static K/V cache: SDPA, split-KV (flash-decoding) FlexAttention, or
two cuBLAS batched matrix products.

With a single query row, SDPA's kernels parallelise over batch x heads only, so a long cache is read by
a few dozen thread blocks (measured on an H200: about 0.2 TB/s at 100K tokens). Flash-decoding splits
the keys into chunks, attends to each in parallel and merges the chunks' partial softmaxes by their
log-sum-exp; PyTorch's FlexAttention selects such a decoding kernel for short queries when compiled
(``torch.nn.attention.flex_attention``; Tri Dao et al., "Flash-Decoding for long-context inference",
2023). The valid-column mask enters as a ``score_mod`` (-inf where a column holds no token), read at
run time, so one compiled kernel serves every step of a static cache. On an H200 it was 2-3x slower
than SDPA (``benchmarks/RESULTS.md`` c2).

``"gemm"`` computes the same attention as matrix products that cuBLAS parallelises over the cache:
the scores ``q K^T`` (float32 output), the masked softmax in float32, then ``P V`` with the cache split
into chunks (split-K by hand: one small product per chunk, summed), so every thread block streams its
own slice of K and of V. P is rounded to the cache's dtype before ``P V``, as flash attention rounds it.
On an H200 (bf16, batch 1, ``benchmarks/results/long_context.md``) it took the 25 % hybrid 4.30 / 4.63 /
5.51 ms per token at 8K / 32K / 100K tokens of context against SDPA's 5.39 / 9.16 / 19.76, and the
teacher 9.63 ms at 100K against SDPA's 66.3: the default on CUDA (``default_decode_attention``). On the
CPU SDPA is faster (2-2.5x at 8K-32K in float32 on 2 cores; the float32 widening makes bf16 products
slower still), so it stays the default there.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GEMM_CHUNK",
    "SPLIT_KV_MIN_HEAD_DIM",
    "DecodeAttention",
    "decode_attention",
    "default_decode_attention",
    "split_kv_supported",
]

DecodeAttention = Literal["sdpa", "split_kv", "gemm"]

GEMM_CHUNK = 2048
"""The longest chunk of the cache one ``P V`` product of ``"gemm"`` reads (a divisor of the cache length:
the largest power-of-two multiple of 256 up to this that divides it, or the whole cache)."""

SPLIT_KV_MIN_HEAD_DIM = 16
"""The smallest head dimension FlexAttention's compiled CUDA kernels accept (Inductor's flex_attention
lowering raises NotImplementedError below it)."""


def default_decode_attention(device: torch.device) -> DecodeAttention:
    """The fastest measured mode on ``device``: ``"gemm"`` on CUDA, ``"sdpa"`` elsewhere (module docstring)."""
    return "gemm" if device.type == "cuda" else "sdpa"


def split_kv_supported(device: torch.device, head_dim: int) -> bool:
    """Whether split-KV attention can run for heads of ``head_dim`` on ``device``: off CUDA always
    (eager FlexAttention), on CUDA from ``SPLIT_KV_MIN_HEAD_DIM``."""
    return device.type != "cuda" or head_dim >= SPLIT_KV_MIN_HEAD_DIM


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    """FlexAttention compiled once per process, with dynamic shapes (one kernel for every cache length)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float, mode: DecodeAttention = "sdpa"
) -> Tensor:
    """Attention output (B, H, 1, Dh) of queries q (B, H, 1, Dh) over keys and values (B, H_kv, T, Dh),
    column t of row b attended iff ``valid[b, t]`` ((B, T) bool; each row needs one valid column).

    Grouped-query attention: query head h reads K/V head h // (H / H_kv), no K/V repeated. ``mode``:
    ``"sdpa"``, SDPA on the (B, H_kv, H / H_kv, Dh) view of q with the column mask; ``"split_kv"``,
    FlexAttention, compiled on CUDA (eager elsewhere: the reference semantics, slow); ``"gemm"``, two
    batched matrix products (module docstring). Raises ValueError for another mode, when H is not a
    multiple of H_kv, or for split-KV on CUDA with Dh below ``SPLIT_KV_MIN_HEAD_DIM``.
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    if mode not in ("sdpa", "split_kv", "gemm"):
        raise ValueError(f"decode attention mode must be 'sdpa', 'split_kv' or 'gemm', got {mode!r}")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    if mode == "split_kv" and not split_kv_supported(q.device, head_dim):
        raise ValueError(f"split-KV attention on CUDA needs a head dimension of at least {SPLIT_KV_MIN_HEAD_DIM}, "
                         f"got {head_dim}")
    if mode == "sdpa":
        grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=valid[:, None, None, :], scale=scale)
        return out.reshape(batch, heads, 1, head_dim)
    if mode == "gemm":
        return _gemm_attention(q, keys, values, valid, scale)

    def mask_invalid(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.where(valid[b, kv_idx], score, -float("inf"))

    if q.is_cuda:
        return _compiled_flex_attention()(q, keys, values, score_mod=mask_invalid, scale=scale, enable_gqa=True)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # "flex_attention called without torch.compile": intended off CUDA
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, keys, values, score_mod=mask_invalid, scale=scale, enable_gqa=True)


def gemm_chunk(length: int) -> int:
    """The chunk of a cache of ``length`` columns that one ``P V`` product of ``"gemm"`` reads."""
    chunk = GEMM_CHUNK
    while chunk >= 256:
        if length % chunk == 0:
            return chunk
        chunk //= 2
    return length


def _bmm_float32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (batched) with a float32 result: cuBLAS accumulates half-precision inputs in float32
    and writes float32 (``out_dtype``) on CUDA; elsewhere the inputs are widened first."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _gemm_attention(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float) -> Tensor:
    batch, heads, _, head_dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    grouped = q.reshape(batch * kv_heads, group, head_dim)
    scores = _bmm_float32(grouped, keys.reshape(batch * kv_heads, length, head_dim).mT)  # (B H_kv, G, T)
    scores = (scores.view(batch, heads, length) * scale).masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)  # (B, H, T)
    chunk = gemm_chunk(length)
    chunks = length // chunk
    probs = probs.view(batch * kv_heads, group, chunks, chunk).transpose(1, 2).reshape(-1, group, chunk)
    partial = _bmm_float32(probs, values.reshape(batch * kv_heads * chunks, chunk, head_dim))  # (B H_kv S, G, Dh)
    out = partial.view(batch * kv_heads, chunks, group, head_dim).sum(dim=1)
    return out.view(batch, heads, 1, head_dim).to(q.dtype)
