"""One query over a static K/V cache: SDPA and split-KV FlexAttention against the softmax written out,
with grouped-query heads, left padding and not-yet-written columns masked."""

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


@pytest.mark.parametrize("split_kv", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_decode_attention_equals_the_masked_softmax(split_kv: bool, heads: int, kv_heads: int) -> None:
    q, keys, values, valid = cache(2, heads, kv_heads, 64, 16)
    out = decode_attention(q, keys, values, valid, 0.25, split_kv)
    torch.testing.assert_close(out, reference(q, keys, values, valid, 0.25), rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_heads_that_do_not_group() -> None:
    q, keys, values, valid = cache(2, 6, 4, 8, 16)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4"):
        decode_attention(q, keys, values, valid, 0.25, split_kv=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_split_kv_on_cuda_equals_the_masked_softmax_at_long_length(dtype: torch.dtype) -> None:
    """The compiled FlexAttention decoding kernel at 32K columns, two lengths from one compile."""
    for length in (32768, 20480):
        q, keys, values, valid = (t.cuda() for t in cache(2, 16, 8, length, 128, seed=length))
        valid[0, 3:length - 100] = True
        q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
        out = decode_attention(q, keys, values, valid, 128**-0.5, split_kv=True)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), reference(q, keys, values, valid, 128**-0.5).float(), rtol=tol, atol=tol)
