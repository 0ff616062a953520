"""The persistent decode step (``mambavlm.ops.mamba_stack_step``) and its nvcc build (``mambavlm.ops.cuda_build``).

On the CPU: where it cannot run it is refused with the reason; the kernel source builds with the project's
build options, which the library reports back, and a second build comes from the cache; nvcc's failures reach
the user. On a Hopper GPU: a decoder stepping through it in its CUDA graph gives the unfused step's tokens and
logits, follows weights changed in place, and repeats bit for bit.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import MambaForCausalLM

from mambavlm.generation import StaticStateDecoder
from mambavlm.ops import cuda_build
from mambavlm.ops.cuda_build import CudaBuildError, build_library, find_nvcc
from mambavlm.ops.mamba_stack_step import SOURCE, stack_step_unsupported
from tests.conftest import strengthen_mixers, tiny_mamba, tiny_mamba_config, tiny_vlm

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc")
on_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0) or find_nvcc() is None,
    reason="needs a GPU of compute capability 9.0 or later and nvcc",
)


def test_the_persistent_step_is_refused_where_it_cannot_run() -> None:
    lm = tiny_mamba()
    assert stack_step_unsupported(lm, 2) == "batch 2 (it runs batch 1)"
    with pytest.raises(ValueError, match=r"persistent_step cannot run this model: weights on cpu \(it runs on CUDA\)"):
        StaticStateDecoder(lm, persistent_step=True)
    vlm = tiny_vlm()
    vlm.set_fused_decode_step(False, persistent=True)  # the switch reaches the decoder, which refuses the CPU
    with pytest.raises(ValueError, match="persistent_step cannot run this model: weights on cpu"):
        vlm.static_decoder()
    vlm.set_fused_decode_step(False)
    assert vlm.static_decoder().persistent_step is False


def test_a_build_without_nvcc_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    with pytest.raises(CudaBuildError, match=r"nvcc not found \(set CUDA_HOME or put nvcc on PATH\) to build x\.cu"):
        build_library(Path("x.cu"), {}, "90")


@needs_nvcc
def test_nvccs_error_reaches_the_user_and_leaves_nothing_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAMBAVLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "broken.cu"
    source.write_text("__global__ void k() { undeclared_name = 1; }\n")
    with pytest.raises(CudaBuildError, match=r"nvcc failed to build broken\.cu[\s\S]*undeclared_name"):
        build_library(source, {"X": 1}, "90")
    assert list((tmp_path / "cache" / "cuda").iterdir()) == []  # no partial library, no temporary left


@needs_nvcc
def test_the_kernel_builds_with_the_projects_options_and_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny Mamba's shape (width 32, inner 64, state 8, rank 2, conv 4) in bfloat16, with the options the
    wrapper builds with: the library reports the consumer warps and ring stages it was built with (so the -D
    options arrive) and lays x_proj's sums out one to a 128-byte line, its shared memory holds the ring and fits a Hopper multiprocessor (227 KiB), and a second
    build is served from the cache without running nvcc."""
    from mambavlm.ops import mamba_stack_step as mss

    monkeypatch.setenv("MAMBAVLM_CACHE", str(tmp_path))
    config = tiny_mamba_config()
    defines = {"MODEL_DIM": config.hidden_size, "INNER_DIM": 2 * config.hidden_size, "STATE_DIM": config.state_size,
               "DT_RANK": 2, "CONV_WIDTH": config.conv_kernel, "WEIGHT_T": "__nv_bfloat16", **mss.build_options()}
    lib = build_library(SOURCE, defines, "90")
    assert lib.mamba_stack_step_threads() == 32 * (mss.CONSUMER_WARPS + 1)
    assert lib.mamba_stack_step_stages() == mss.RING_STAGES
    assert lib.mamba_stack_step_max_channels() == mss.MAX_CHANNELS
    assert lib.mamba_stack_step_max_rows() == mss.MAX_ROWS
    assert lib.mamba_stack_step_xacc_stride() * 8 == 128  # x_proj's 64-bit sums one to a 128-byte line
    assert mss.RING_STAGES * mss.STAGE_BYTES < lib.mamba_stack_step_smem_bytes() <= 227 << 10

    def no_nvcc(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"nvcc ran again: {args}")

    monkeypatch.setattr(subprocess, "run", no_nvcc)
    assert build_library(SOURCE, defines, "90").mamba_stack_step_stages() == mss.RING_STAGES


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["tiny", "wide", "wide on 13 blocks"])
def test_the_persistent_step_replays_in_the_cuda_graph_to_the_unfused_tokens(
    dtype: torch.dtype, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy decoding from one prompt, the persistent step in the decoder's CUDA graph against the unfused
    step: the same tokens (up to a near tie) and logits within float32's or bfloat16's tolerance; after the
    weights change in place (A, dt's bias, x_proj, a norm) the next prefill's decoding follows them; and a
    second decoder fed the same tokens gives the same logits bit for bit (its sums are exact in fixed point).
    "wide": 4 layers of width 256 (inner 512: 64 programs of 8 channels). "wide on 13 blocks": the same model on
    a grid of 13, so each block streams 32-40 in_proj rows and 19-20 out_proj rows over several ring stages, a
    number that is not a multiple of the stages a consumer warp takes at a time (``GEMV_UNROLL``)."""
    from mambavlm.ops import mamba_stack_step as mss
    from tests.conftest import assert_same_up_to_near_tie, strengthen_mixers

    if shape == "wide on 13 blocks":
        monkeypatch.setattr(mss, "_grid", lambda inner, multiprocessors: 13)
    if shape == "tiny":
        lm = tiny_mamba()
    else:
        torch.manual_seed(2)
        lm = strengthen_mixers(MambaForCausalLM(tiny_mamba_config(hidden_size=256, num_hidden_layers=4,
                                                                  state_size=16)).eval())
    lm = lm.to("cuda", dtype)
    generator = torch.Generator("cuda").manual_seed(0)
    embeds = lm.get_input_embeddings()(torch.randint(3, lm.config.vocab_size, (1, 33), device="cuda",
                                                     generator=generator))

    def decode(decoder: StaticStateDecoder, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = decoder.prefill(embeds, max_new_tokens=20)
            tokens, seen = [], []
            for t in range(20):
                seen.append(logits.clone())
                tokens.append(logits.argmax(-1) if forced is None else forced[:, t])
                logits = decoder.step(tokens[-1])
        return torch.stack(tokens, 1), torch.stack(seen, 1)

    unfused = StaticStateDecoder(lm)
    persistent = StaticStateDecoder(lm, persistent_step=True)
    assert persistent.cuda_graph
    for change in (False, True):
        if change:
            with torch.no_grad():
                for layer in lm.backbone.layers:
                    layer.mixer.A_log.add_(0.25)
                    layer.mixer.dt_proj.bias.sub_(0.5)
                    layer.mixer.x_proj.weight.mul_(1.5)
                    layer.norm.weight.mul_(0.75)
        reference = decode(unfused)
        ours = decode(persistent)
        assert persistent._stack is not None  # it really stepped through the kernel
        tol = 1e-4 * float(reference[1].abs().max()) if dtype == torch.float32 else 0.03 * float(reference[1].abs().max())
        assert_same_up_to_near_tie(ours[0], reference[0], reference[1], tol)
        assert len(set(reference[0].flatten().tolist())) > 3
        forced = decode(unfused, reference[0])[1]
        again = decode(StaticStateDecoder(lm, persistent_step=True), reference[0])[1]
        mine = decode(persistent, reference[0])[1]
        assert (mine - forced).abs().max() <= tol
        assert torch.equal(mine, again)


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["wide", "wide on 13 blocks"])
def test_greedy_decoding_in_the_kernel_gives_the_one_step_paths_tokens_bit_for_bit(
    dtype: torch.dtype, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``generate`` with the persistent step decodes greedily in the kernel (150 new tokens: launches of 64, 64
    and 21 steps, the argmax and the next token's embedding between steps in the kernel), against the same
    decoder stepping one token a CUDA-graph replay with ``torch.argmax`` between: the same tokens, and the last
    step's logits bit for bit. With an EOS id (the reference's 40th token) it ends where ``StaticDecoder.decode``
    ends (launches of 8, each checked while the next runs). With lm_head's rows tied across the blocks (rows
    from 30 on all one row, the rest its negation) the largest logit of every step is shared by many blocks'
    rows, and the kernel takes the first of them, as ``torch.argmax`` does. One greedy step a launch (the kernel
    built without the step loop, which a chunk of one token runs) gives the same tokens and logits."""
    from mambavlm.ops import mamba_stack_step as mss

    if shape == "wide on 13 blocks":
        monkeypatch.setattr(mss, "_grid", lambda inner, multiprocessors: 13)
    torch.manual_seed(3)
    lm = MambaForCausalLM(tiny_mamba_config(hidden_size=256, num_hidden_layers=4, state_size=16)).eval()
    lm = strengthen_mixers(lm).to("cuda", dtype)
    generator = torch.Generator("cuda").manual_seed(0)
    embeds = lm.get_input_embeddings()(torch.randint(3, lm.config.vocab_size, (1, 21), device="cuda",
                                                     generator=generator))
    decoder = StaticStateDecoder(lm, persistent_step=True)

    def stepwise(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = decoder.prefill(embeds, max_new_tokens=n)
            tokens = [logits.argmax(-1)]
            for _ in range(n - 1):
                logits = decoder.step(tokens[-1])
                tokens.append(logits.argmax(-1))
        return torch.stack(tokens, 1), logits.clone()

    def in_kernel(n: int, eos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = decoder.generate(embeds, max_new_tokens=n, eos_token_id=eos)
        return tokens, decoder._stack.logits.clone()

    def one_a_launch(n: int) -> tuple[torch.Tensor, torch.Tensor]:  # the one-step greedy kernel, launch after launch
        with torch.no_grad():
            out = torch.empty(n, dtype=torch.long, device="cuda")
            out[:1] = decoder.prefill(embeds, max_new_tokens=n).argmax(-1)
            for t in range(1, n):
                decoder._stack.greedy(out[t - 1 : t], out[t : t + 1])
        return out[None], decoder._stack.logits.clone()

    reference, last = stepwise(150)
    assert len(set(reference.flatten().tolist())) > 10
    for tokens, logits in (in_kernel(150), one_a_launch(150)):
        assert torch.equal(tokens, reference)
        assert torch.equal(logits, last)

    eos = int(reference[0, 39])
    first = int((reference[0] == eos).nonzero()[0])
    assert torch.equal(in_kernel(150, eos)[0], reference[:, : first + 1])

    with torch.no_grad():
        row = lm.lm_head.weight[30].clone()
        lm.lm_head.weight[30:] = row
        lm.lm_head.weight[:30] = -row
    reference, last = stepwise(24)
    assert set(reference.flatten().tolist()) <= {0, 30}  # the first of a tied group (0-29 or 30-96)
    for tokens, logits in (in_kernel(24), one_a_launch(24)):
        assert torch.equal(tokens, reference)
        assert torch.equal(logits, last)


@pytest.mark.gpu
@on_hopper
def test_choosing_the_exchange_buffers_leaves_the_states_and_the_step_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``MambaStackStep`` times six allocations of its y and residual words at construction, running the kernel on
    the decoder's states: the states must come back bit for bit, and a step from them must give the logits and
    states of a step built without the choice (one allocation) from copies of the same states."""
    from mambavlm.generation.mamba1 import StatefulMambaMixer
    from mambavlm.ops import mamba_stack_step as mss

    torch.manual_seed(5)
    lm = MambaForCausalLM(tiny_mamba_config(hidden_size=256, num_hidden_layers=4, state_size=16)).eval()
    lm = strengthen_mixers(lm).to("cuda", torch.bfloat16)
    generator = torch.Generator("cuda").manual_seed(2)

    def random_states() -> list:
        states = [StatefulMambaMixer(layer.mixer).allocate(1) for layer in lm.backbone.layers]
        for state in states:
            state.conv.normal_(generator=generator)
            state.ssm.normal_(generator=generator)
        return states

    chosen_states = random_states()
    plain_states = [dataclasses.replace(s, conv=s.conv.clone(), ssm=s.ssm.clone()) for s in chosen_states]
    before = [(s.conv.clone(), s.ssm.clone()) for s in chosen_states]
    chosen = mss.MambaStackStep(lm, chosen_states)
    assert len(chosen.exchange_times_ms) == mss.EXCHANGE_CANDIDATES > 1
    for state, (conv, ssm) in zip(chosen_states, before):
        assert torch.equal(state.conv, conv) and torch.equal(state.ssm, ssm)
    monkeypatch.setattr(mss, "EXCHANGE_CANDIDATES", 1)
    plain = mss.MambaStackStep(lm, plain_states)
    residual = torch.randn(1, 256, device="cuda", generator=generator)
    logits = chosen(residual.clone()).clone()
    assert torch.equal(logits, plain(residual.clone()))
    for a, b in zip(chosen_states, plain_states):
        assert torch.equal(a.conv, b.conv) and torch.equal(a.ssm, b.ssm)
