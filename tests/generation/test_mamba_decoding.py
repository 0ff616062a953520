"""The static-state decoder for Mamba and Mamba-2 LMs: same tokens as HF generate and as recomputing
everything, EOS handling, state reuse, the MambaVLM hook, and (on CUDA) the CUDA-graph path."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, MambaForCausalLM, PreTrainedModel

from mambavlm.generation import StaticStateDecoder
from mambavlm.model import MambaVLM
from mambavlm.ops.dispatch import DISABLE_KERNELS_ENV, kernels_available
from tests.conftest import (
    TINY_LMS,
    TINY_VOCAB,
    assert_same_up_to_near_tie,
    left_padded_prompt,
    strengthen_mixers,
    tiny_mamba,
    tiny_mamba_config,
    tiny_vlm,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# transformers routes its Mamba ops to an installed mamba_ssm / causal_conv1d whatever the device,
# so its CPU reference cannot run where those CUDA kernels are installed; the GPU tests compare there.
hf_cpu_reference = pytest.mark.skipif(
    any(kernels_available().values()),
    reason="transformers sends CPU tensors to the installed CUDA kernels; compared on CUDA instead",
)


def recompute_greedy(model: PreTrainedModel, embeds: Tensor, mask: Tensor, steps: int) -> Tensor:
    """Greedy decoding without any cache: the whole sequence through the model for every token."""
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, -1]
            next_ids = logits.argmax(-1)
            tokens.append(next_ids)
            embeds = torch.cat([embeds, model.get_input_embeddings()(next_ids)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1)


def hf_generate(model: PreTrainedModel, embeds: Tensor, mask: Tensor, **kwargs: object) -> Tensor:
    with torch.no_grad():
        return model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, **kwargs)


@hf_cpu_reference
@pytest.mark.parametrize("family", sorted(TINY_LMS))
def test_prefill_and_steps_give_the_full_forward_logits(family: str) -> None:
    """Prefill on a left-padded prefix, then steps: each logit row equals HF's uncached forward."""
    model = TINY_LMS[family]()
    embeds, mask = left_padded_prompt(model)
    ids = torch.randint(0, TINY_VOCAB, (2, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full_embeds = torch.cat([embeds, model.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        expected = model(inputs_embeds=full_embeds, attention_mask=full_mask, use_cache=False).logits
    decoder = StaticStateDecoder(model)
    prompt_len = embeds.shape[1]
    got = [decoder.prefill(embeds, mask)] + [decoder.step(ids[:, t]).clone() for t in range(ids.shape[1])]
    for t, logits in enumerate(got):
        torch.testing.assert_close(logits, expected[:, prompt_len - 1 + t], rtol=1e-4, atol=1e-4)


@hf_cpu_reference
@pytest.mark.parametrize("family", sorted(TINY_LMS))
def test_greedy_tokens_equal_hf_generate_and_recomputation(family: str) -> None:
    """Left-padded batch of 2, then batch 1 with the same decoder (its state is re-allocated)."""
    model = TINY_LMS[family]()
    decoder = StaticStateDecoder(model)
    for lengths in ((19, 13), (9,)):
        embeds, mask = left_padded_prompt(model, lengths)
        ours = decoder.generate(embeds, mask, max_new_tokens=10, eos_token_id=None)
        assert ours.shape == (len(lengths), 10)
        assert len(set(ours[0].tolist())) > 3, "a degenerate model would make this test weak"
        torch.testing.assert_close(ours, hf_generate(model, embeds, mask, max_new_tokens=10, eos_token_id=None))
        torch.testing.assert_close(ours, recompute_greedy(model, embeds, mask, 10))


@hf_cpu_reference
@pytest.mark.parametrize("family", sorted(TINY_LMS))
def test_weights_changed_in_place_reach_the_next_generation(family: str) -> None:
    """The float32 copies of A and dt_bias are refreshed by each prefill (e.g. after a training step)."""
    model = TINY_LMS[family]()
    embeds, mask = left_padded_prompt(model)
    decoder = StaticStateDecoder(model)
    before = decoder.generate(embeds, mask, max_new_tokens=10, eos_token_id=None)
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.A_log.mul_(0.3)
            bias = layer.mixer.dt_proj.bias if family == "mamba" else layer.mixer.dt_bias
            bias.add_(1.0)
    after = decoder.generate(embeds, mask, max_new_tokens=10, eos_token_id=None)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, hf_generate(model, embeds, mask, max_new_tokens=10, eos_token_id=None))


@hf_cpu_reference
def test_eos_stops_and_pads_like_hf_generate() -> None:
    """Row 0 meets EOS early and is padded; generation stops where row 1 meets it, as in HF."""
    model = tiny_mamba()
    embeds, mask = left_padded_prompt(model)
    free = StaticStateDecoder(model).generate(embeds, mask, max_new_tokens=20, eos_token_id=None)

    def first_hits(eos: list[int]) -> list[int]:
        return [int(torch.isin(row, torch.tensor(eos)).nonzero()[0]) for row in free]

    candidates = ([int(free[0, i]), int(free[1, j])] for i in range(1, 5) for j in range(9, 19))
    eos = next(e for e in candidates if first_hits(e)[0] < 5 and 9 <= first_hits(e)[1] < 19)
    hits = first_hits(eos)
    expected_len = hits[1] + 1
    pad = 5
    ours = StaticStateDecoder(model).generate(embeds, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad)
    reference = hf_generate(model, embeds, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad)
    torch.testing.assert_close(ours, reference)
    assert ours.shape[1] == expected_len
    assert (ours[0, hits[0] + 1 :] == pad).all()


def test_decoder_rejects_what_it_cannot_run() -> None:
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=TINY_VOCAB
        )
    )
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        StaticStateDecoder(llama)
    model = tiny_mamba()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True"):
            StaticStateDecoder(model, cuda_graph=True)
    decoder = StaticStateDecoder(model)
    with pytest.raises(RuntimeError, match="prefill before step"):
        decoder.step(torch.zeros(1, dtype=torch.long))
    embeds, mask = left_padded_prompt(model)
    with pytest.raises(ValueError, match="left-padded"):
        decoder.prefill(embeds, mask.flip(1))
    holed = mask.clone()
    holed[1, -3] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have a 0 after a 1"):
        decoder.prefill(embeds, holed)
    decoder.prefill(embeds, mask)
    with pytest.raises(ValueError, match=r"input_ids must be \(2,\)"):
        decoder.step(torch.zeros(3, dtype=torch.long))


def strengthened_vlm() -> MambaVLM:
    """The tiny MambaVLM, its LLM's mixers strengthened so that tokens depend on the image."""
    model = tiny_vlm(load_weights=False)
    strengthen_mixers(model.llm)
    return model


@hf_cpu_reference
def test_vlm_fast_path_gives_hf_generate_tokens() -> None:
    """An image prompt and a shorter text-only prompt, left-padded together, through generate_ids and
    generate: fast=True (static state) == fast=False (HF generate); greedy and seeded sampling."""
    model = strengthened_vlm()
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    ids = [model.build_prompt_ids("what is it ?", True), model.build_prompt_ids("hello", False)]
    width = max(len(x) for x in ids)
    input_ids = torch.full((2, width), model.tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x) :] = torch.tensor(x)
        mask[row, width - len(x) :] = 1
    pixels = model.preprocess_images([image])
    kwargs = {"max_new_tokens": 8, "eos_token_id": None}
    fast = model.generate_ids(input_ids, mask, pixels, fast=True, **kwargs)
    torch.testing.assert_close(fast, model.generate_ids(input_ids, mask, pixels, fast=False, **kwargs))
    assert model.answer([image], ["what is it ?"], fast=True) == model.answer([image], ["what is it ?"], fast=False)
    assert model.static_decoder() is model.static_decoder()
    copied = copy.deepcopy(model)
    assert copied.static_decoder().model is copied.llm
    torch.testing.assert_close(copied.generate_ids(input_ids, mask, pixels, fast=True, **kwargs), fast)

    def sample() -> Tensor:
        torch.manual_seed(3)
        return model.generate_ids(input_ids, mask, pixels, fast=True, do_sample=True, **kwargs)

    torch.testing.assert_close(sample(), sample())


# ---------------------------------------------------------------- CUDA: the captured step


def greedy_with_logits(decoder: StaticStateDecoder, embeds: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Greedy tokens (B, T) and the logits each was chosen from (B, T, V), one step at a time."""
    logits = decoder.prefill(embeds)
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits.clone())
        tokens.append(logits.argmax(-1))
        logits = decoder.step(tokens[-1])
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)


def kernel_modes() -> list[object]:
    installed = any(kernels_available().values())
    return ["pytorch", pytest.param("kernels", marks=pytest.mark.skipif(not installed, reason="no kernels"))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ops", kernel_modes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(TINY_LMS))
def test_cuda_graph_tokens_equal_eager_and_hf(family: str, dtype: torch.dtype, ops: str, monkeypatch) -> None:
    """CUDA-graph replay vs the same decoder run eagerly, and vs HF generate on CUDA. fp32: equal
    tokens (tolerance 1e-3 on a tie). bf16: equal until a near-tie, a step where the reference's
    logits of the two tokens are within 2 % of the largest logit magnitude."""
    if ops == "pytorch":
        monkeypatch.setenv(DISABLE_KERNELS_ENV, "1")
    model = TINY_LMS[family]().to("cuda", dtype)
    embeds, _ = left_padded_prompt(model, (24, 24))
    graph = StaticStateDecoder(model)
    eager = StaticStateDecoder(model, cuda_graph=False)
    assert graph.cuda_graph and not eager.cuda_graph
    graph_tokens, _ = greedy_with_logits(graph, embeds, 16)
    eager_tokens, eager_logits = greedy_with_logits(eager, embeds, 16)
    tol = 1e-3 if dtype == torch.float32 else 0.02 * float(eager_logits.abs().max())
    assert_same_up_to_near_tie(graph_tokens, eager_tokens, eager_logits, tol)
    torch.testing.assert_close(graph.generate(embeds, max_new_tokens=16, eos_token_id=None), graph_tokens)
    with torch.no_grad():
        hf = model.generate(
            inputs_embeds=embeds, max_new_tokens=16, do_sample=False, eos_token_id=None,
            output_scores=True, return_dict_in_generate=True,
        )
    hf_logits = torch.stack(hf.scores, 1)
    tol = 1e-3 if dtype == torch.float32 else 0.02 * float(hf_logits.abs().max())
    assert_same_up_to_near_tie(graph_tokens, hf.sequences, hf_logits, tol)


@pytest.mark.parametrize("family", sorted(TINY_LMS))
def test_state_and_graph_are_kept_across_generations_of_one_batch_size(family: str) -> None:
    """A second prompt of the same batch size reuses the state buffers (and on CUDA the captured
    graph); another batch size re-allocates."""
    model = TINY_LMS[family]()
    decoder = StaticStateDecoder(model)
    embeds, mask = left_padded_prompt(model)
    decoder.generate(embeds, mask, max_new_tokens=3, eos_token_id=None)
    conv, prepared = decoder._states[0].conv, decoder._prepared_for
    decoder.generate(embeds[:, 4:], mask[:, 4:], max_new_tokens=7, eos_token_id=None)
    assert decoder._states[0].conv is conv and decoder._prepared_for is prepared
    decoder.generate(embeds[:1], mask[:1], max_new_tokens=3, eos_token_id=None)
    assert decoder._states[0].conv is not conv and decoder.batch_size == 1


@hf_cpu_reference
@pytest.mark.parametrize("use_bias", [False, True], ids=["bias-free", "biased-projections"])
def test_mamba1_prefill_masks_padding_as_hf_with_and_without_projection_biases(use_bias: bool) -> None:
    """The Mamba-1 prefill masks left padding its own way (the input once for bias-free blocks, the
    scan's B instead of the conv output): a batch with 0, 5 and 11 pads, whose length is not a multiple
    of 8 (so the prefill pads further), gives HF's uncached last logits row by row, with in_proj /
    out_proj biases too (where the input is masked in every layer)."""
    torch.manual_seed(3)
    config = tiny_mamba_config()
    config.use_bias = use_bias
    model = strengthen_mixers(MambaForCausalLM(config).eval())
    if use_bias:
        with torch.no_grad():
            for layer in model.backbone.layers:
                layer.mixer.in_proj.bias.normal_(std=0.5)
                layer.mixer.out_proj.bias.normal_(std=0.5)
    embeds, mask = left_padded_prompt(model, (21, 16, 10))
    decoder = StaticStateDecoder(model)
    assert decoder.mamba1_bias_free is not use_bias
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, -1]
        got = decoder.prefill(embeds, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
