"""Static KV + SSM cache decoding (``HybridStaticDecoder``) for LLaMA teachers, hybrids and linear
students: the same logits as the uncached forward and the same tokens as HF ``generate``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor
from transformers import LlamaForCausalLM

from mambavlm.distill.convert import convert_llama, convert_vlm
from mambavlm.generation import HybridStaticDecoder, build_static_decoder
from mambavlm.generation.hybrid_lm import CAPACITY_MULTIPLE
from mambavlm.llm.hybrid import mamba_mixers
from mambavlm.ops.decode_attention import (
    SPLIT_KV_MIN_HEAD_DIM,
    default_decode_attention,
    split_kv_supported,
)
from tests.conftest import (
    TINY_LLAMA,
    assert_same_up_to_near_tie,
    perturb_mixers,
    tiny_llama,
    tiny_llama_vlm,
)

LAYOUTS = ["teacher", "head-interleaved:4", "linear"]  # all attention / attention in layer 0 of 4 / none


def model_for(layout: str, **changes: object) -> LlamaForCausalLM:
    teacher = tiny_llama(**changes)
    if layout == "teacher":
        return teacher
    hybrid = convert_llama(teacher, layout, "matvlm").eval()
    perturb_mixers(hybrid)
    return hybrid


def left_padded(lengths: tuple[int, ...], seed: int = 5) -> tuple[Tensor, Tensor]:
    """Random prompts of ``lengths``, left-padded: ids (B, L), mask (B, L)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, TINY_LLAMA["vocab_size"], (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def hf_tokens(model: LlamaForCausalLM, ids: Tensor, mask: Tensor, new: int) -> Tensor:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("attention", ["sdpa", "split_kv", "gemm"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_and_steps_give_the_uncached_forward_logits(layout: str, attention: str) -> None:
    model = model_for(layout)
    ids, mask = left_padded((11, 6))
    more = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full_ids = torch.cat([ids, more], 1)
        full_mask = torch.cat([mask, torch.ones_like(more)], 1)
        expected = model(input_ids=full_ids, attention_mask=full_mask, use_cache=False).logits
        decoder = HybridStaticDecoder(model, attention=attention)
        embeds = model.get_input_embeddings()(ids)
        got = [decoder.prefill(embeds, mask, max_new_tokens=4)]
        got += [decoder.step(more[:, t]).clone() for t in range(more.shape[1])]
    for t, logits in enumerate(got):
        torch.testing.assert_close(logits, expected[:, ids.shape[1] - 1 + t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_equal_hf_generate(layout: str) -> None:
    """A left-padded batch of 3, then a batch of 1 with the same decoder (buffers re-allocated)."""
    model = model_for(layout)
    decoder = build_static_decoder(model)
    assert isinstance(decoder, HybridStaticDecoder)
    for lengths in ((9, 5, 7), (12,)):
        ids, mask = left_padded(lengths)
        with torch.no_grad():
            ours = decoder.generate(model.get_input_embeddings()(ids), mask, max_new_tokens=10, eos_token_id=None)
        assert len(set(ours.flatten().tolist())) > 4, "a degenerate model would make this test weak"
        torch.testing.assert_close(ours, hf_tokens(model, ids, mask, 10))


def test_attention_mode_is_checked_and_the_default_follows_the_device() -> None:
    """No mode asked for: SDPA on the CPU, cuBLAS products on CUDA (the faster on each, measured)."""
    model = model_for("teacher")
    with pytest.raises(ValueError, match="attention must be 'sdpa', 'split_kv' or 'gemm', got 'auto'"):
        HybridStaticDecoder(model, attention="auto")
    decoder = HybridStaticDecoder(model)
    ids, mask = left_padded((5,))
    with torch.no_grad():
        decoder.prefill(model.get_input_embeddings()(ids), mask, max_new_tokens=2)
    assert decoder.attention is None and decoder.attention_mode == "sdpa"
    assert default_decode_attention(torch.device("cpu")) == "sdpa"
    assert default_decode_attention(torch.device("cuda", 1)) == "gemm"
    kept = copy.deepcopy(HybridStaticDecoder(model, attention="gemm"))
    assert kept.attention == kept.attention_mode == "gemm"


def test_cache_capacity_is_reused_grown_and_enforced() -> None:
    model = model_for("head-interleaved:4")
    decoder = HybridStaticDecoder(model)
    embed = model.get_input_embeddings()
    ids, mask = left_padded((9, 5))
    with torch.no_grad():
        decoder.generate(embed(ids), mask, max_new_tokens=10, eos_token_id=None)
        keys = decoder._kv[0][0]
        assert decoder.capacity == CAPACITY_MULTIPLE and keys.shape[2] == CAPACITY_MULTIPLE
        decoder.generate(embed(ids), mask, max_new_tokens=20, eos_token_id=None)
        assert decoder._kv[0][0] is keys, "a call that fits reuses the buffers"
        long_ids, long_mask = left_padded((CAPACITY_MULTIPLE, 3))
        tokens = decoder.generate(embed(long_ids), long_mask, max_new_tokens=5, eos_token_id=None)
        assert decoder.capacity == 2 * CAPACITY_MULTIPLE and tokens.shape == (2, 5)
        decoder.prefill(embed(ids), mask, max_new_tokens=0)
        for _ in range(decoder.capacity - ids.shape[1]):
            decoder.step(torch.zeros(2, dtype=torch.long))
        with pytest.raises(ValueError, match="static cache holds 512 tokens and is full"):
            decoder.step(torch.zeros(2, dtype=torch.long))


def test_linear_student_needs_no_kv_and_has_no_capacity_limit() -> None:
    model = model_for("linear")
    decoder = HybridStaticDecoder(model)
    ids, mask = left_padded((6, 4))
    with torch.no_grad():
        decoder.prefill(model.get_input_embeddings()(ids), mask)
        for _ in range(CAPACITY_MULTIPLE + 3):
            decoder.step(torch.ones(2, dtype=torch.long))
    assert decoder.capacity == 0 and not decoder._kv


def test_vlm_with_a_hybrid_llm_fast_path_gives_hf_generate_tokens() -> None:
    from PIL import Image

    student = convert_vlm(tiny_llama_vlm(vocab_size=1024), "head-interleaved:2", "mmmamba").eval()
    perturb_mixers(student.llm)
    image = Image.new("RGB", (40, 30), (20, 180, 60))
    prompts = [student.build_prompt_ids("what colour is it", True), student.build_prompt_ids("hi", False)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    pixels = student.preprocess_images([image])
    kwargs = {"max_new_tokens": 8, "eos_token_id": None}
    fast = student.generate_ids(ids, mask, pixels, fast=True, **kwargs)
    assert isinstance(student.static_decoder(), HybridStaticDecoder)
    torch.testing.assert_close(fast, student.generate_ids(ids, mask, pixels, fast=False, **kwargs))


# ---------------------------------------------------------------- CUDA: the captured step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_tokens_equal_eager_and_hf(layout: str, dtype: torch.dtype) -> None:
    """CUDA-graph replay vs the same decoder run eagerly and vs HF generate, on a left-padded batch.
    fp32: equal tokens (a tie within 1e-3 may flip); bf16: equal until a near-tie (2 % of the
    largest logit)."""
    model = model_for(layout).to("cuda", dtype)
    ids, mask = left_padded((70, 41))
    ids, mask = ids.cuda(), mask.cuda()
    embeds = model.get_input_embeddings()(ids)
    graph, eager = HybridStaticDecoder(model), HybridStaticDecoder(model, cuda_graph=False)
    assert graph.cuda_graph and not eager.cuda_graph
    steps = 16

    def greedy(decoder: HybridStaticDecoder) -> tuple[Tensor, Tensor]:
        logits = decoder.prefill(embeds, mask, max_new_tokens=steps)
        tokens, seen = [], []
        for _ in range(steps):
            seen.append(logits.clone())
            tokens.append(logits.argmax(-1))
            logits = decoder.step(tokens[-1])
        return torch.stack(tokens, 1), torch.stack(seen, 1)

    with torch.no_grad():
        graph_tokens, _ = greedy(graph)
        eager_tokens, eager_logits = greedy(eager)
        hf = model.generate(
            ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )
    hf_logits = torch.stack(hf.scores, 1).float()
    for reference, logits in ((eager_tokens, eager_logits), (hf.sequences[:, ids.shape[1] :], hf_logits)):
        tol = 1e-3 if dtype == torch.float32 else 0.02 * float(logits.abs().max())
        assert_same_up_to_near_tie(graph_tokens, reference, logits, tol)


def test_weights_changed_in_place_reach_the_next_generation() -> None:
    """The mixers' constants (A, dt_bias, D, norm weight) are refreshed by every prefill."""
    model = model_for("head-interleaved:4")
    decoder = HybridStaticDecoder(model)
    ids, mask = left_padded((9, 5))
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        before = decoder.generate(embeds, mask, max_new_tokens=10, eos_token_id=None)
        for mixer in mamba_mixers(model).values():
            mixer.A_log.sub_(1.5)
            mixer.dt_bias.add_(1.0)
            mixer.norm.weight.mul_(3.0)
        after = decoder.generate(embeds, mask, max_new_tokens=10, eos_token_id=None)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, hf_tokens(model, ids, mask, 10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["teacher", "head-interleaved:4"])
def test_split_kv_and_default_cuda_graph_steps_equal_sdpa_on_a_long_cache(layout: str) -> None:
    """Split-KV's CUDA-graph steps (compiled FlexAttention inside the graph) and the CUDA default's
    (cuBLAS products) on a long cache give SDPA's logits (float32) on a padded batch. Heads of 16
    (width 64): FlexAttention's CUDA kernels take no fewer."""
    model = model_for(layout, hidden_size=64).to("cuda")
    ids, mask = left_padded((300, 251))
    ids, mask = ids.cuda(), mask.cuda()
    embeds = model.get_input_embeddings()(ids)
    new = 8192  # a long cache: room to decode
    runs = {}
    for attention in ("split_kv", None, "sdpa"):
        decoder = HybridStaticDecoder(model, attention=attention)
        with torch.no_grad():
            logits = decoder.prefill(embeds, mask, max_new_tokens=new)
            seen = []
            for _ in range(12):
                seen.append(logits.clone())
                logits = decoder.step(logits.argmax(-1))
        runs[decoder.attention_mode] = torch.stack(seen, 1)
    assert set(runs) == {"split_kv", "gemm", "sdpa"}
    torch.testing.assert_close(runs["split_kv"], runs["sdpa"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(runs["gemm"], runs["sdpa"], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_kv_refuses_heads_too_small_for_flexattention_on_cuda() -> None:
    """The tiny model's heads of 8 are below FlexAttention's CUDA minimum: "split_kv" says why it
    cannot run."""
    model = model_for("teacher").to("cuda")
    assert model.model.layers[0].self_attn.head_dim < SPLIT_KV_MIN_HEAD_DIM
    ids, mask = left_padded((5, 3))
    embeds = model.get_input_embeddings()(ids.cuda())
    with pytest.raises(ValueError, match="head dimension 8"):
        HybridStaticDecoder(model, attention="split_kv").prefill(embeds, mask.cuda(), max_new_tokens=4)


def test_split_kv_is_supported_off_cuda_always_and_on_cuda_from_heads_of_16() -> None:
    assert split_kv_supported(torch.device("cpu"), 8)
    assert not split_kv_supported(torch.device("cuda"), 8)
    assert split_kv_supported(torch.device("cuda"), SPLIT_KV_MIN_HEAD_DIM)
    assert SPLIT_KV_MIN_HEAD_DIM == 16
