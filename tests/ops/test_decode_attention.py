"""One query over a static K/V cache: SDPA, split-KV FlexAttention and the cuBLAS products against the
softmax written out, with grouped-query heads, left padding and not-yet-written columns masked."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mambavlm.ops.decode_attention import decode_attention


def reference(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale, masked) v with each K/V head repeated for its query heads, in float64."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = (q.double() @ k.mT) * scale  # (B, H, 1, T)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def cache(batch: int, heads: int, kv_heads: int, length: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g)
    keys = torch.randn(batch, kv_heads, length, dim, generator=g)
    values = torch.randn(batch, kv_heads, length, dim, generator=g)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    valid[0, 3:40] = True  # 3 columns of left padding, columns from 40 not written yet
    valid[1, 0:17] = True
    return q, keys, values, valid


@pytest.mark.parametrize("mode", ["sdpa", "split_kv", "gemm"])
@pytest.mark.parametrize(("heads", "kv_heads", "length"), [(4, 4, 64), (8, 2, 64), (8, 2, 1024), (4, 2, 4352)])
def test_decode_attention_equals_the_masked_softmax(mode: str, heads: int, kv_heads: int, length: int) -> None:
    """Every mode against the masked softmax, float32; lengths where "gemm" reads the cache whole (64),
    in 4 chunks of 256 (1024) and in 17 of 256 (4352 = 17 x 256)."""
    q, keys, values, valid = cache(2, heads, kv_heads, length, 16)
    valid[1, length - 70:length - 9] = True  # columns far along the cache too
    out = decode_attention(q, keys, values, valid, 0.25, mode)
    torch.testing.assert_close(out, reference(q, keys, values, valid, 0.25), rtol=1e-5, atol=1e-5)


def test_gemm_chunks_divide_the_cache() -> None:
    from mambavlm.ops.decode_attention import gemm_chunk

    assert [gemm_chunk(n) for n in (64, 256, 1024, 4352, 8192, 100352, 100096)] == [64, 256, 1024, 256, 2048, 2048, 256]
    with pytest.raises(ValueError, match="mode must be 'sdpa', 'split_kv' or 'gemm', got 'flash'"):
        decode_attention(*cache(2, 2, 2, 8, 16), 0.25, "flash")


def test_decode_attention_refuses_heads_that_do_not_group() -> None:
    q, keys, values, valid = cache(2, 6, 4, 8, 16)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4"):
        decode_attention(q, keys, values, valid, 0.25, "sdpa")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["split_kv", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_modes_on_cuda_equal_the_masked_softmax_at_long_length(dtype: torch.dtype, mode: str) -> None:
    """The compiled FlexAttention decoding kernel (two lengths from one compile) and the cuBLAS products
    (float32 scores from bf16 inputs: ``out_dtype``) at 32K and 20K columns."""
    for length in (32768, 20480):
        q, keys, values, valid = (t.cuda() for t in cache(2, 16, 8, length, 128, seed=length))
        valid[0, 3:length - 100] = True
        q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
        out = decode_attention(q, keys, values, valid, 128**-0.5, mode)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), reference(q, keys, values, valid, 128**-0.5).float(), rtol=tol, atol=tol)
