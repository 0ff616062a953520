"""The fused Mamba-1 step kernels (``mambavlm.ops.mamba_step``) against the PyTorch step, run by Triton's
interpreter on the CPU (a subprocess: ``TRITON_INTERPRET`` is read when Triton loads), and on CUDA."""

from __future__ import annotations

import textwrap

import pytest
import torch

from mambavlm.generation import StaticStateDecoder
from mambavlm.ops.mamba_step import triton_available
from tests.conftest import run_under_triton_interpreter, tiny_llama, tiny_mamba, tiny_vlm

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

CHECKS = textwrap.dedent(
    """
    import copy
    import torch
    from mambavlm.generation import StaticStateDecoder
    from mambavlm.generation.mamba1 import StatefulMambaMixer
    from tests.conftest import tiny_mamba, tiny_vlm

    torch.set_grad_enabled(False)
    model = tiny_vlm()
    for conv_bias in (True, False):
        mixer = StatefulMambaMixer(model.llm.backbone.layers[1].mixer)
        if not conv_bias:
            mixer.mixer.conv1d.bias = None
        m = mixer.mixer
        for batch in (1, 3):  # a column of programs per sequence
            torch.manual_seed(batch)
            state = mixer.allocate(batch)
            state.A.copy_(-torch.exp(m.A_log.float()))
            state.dt_bias.copy_(m.dt_proj.bias)
            state.conv.normal_()
            state.ssm.normal_()
            expected = copy.deepcopy(state)
            for _ in range(3):
                hidden = torch.randn(batch, m.hidden_size)
                want = mixer.step(hidden, expected)
                got = mixer.step_fused(hidden, state)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(state.ssm, expected.ssm, rtol=1e-5, atol=1e-5)
                assert torch.equal(state.conv, expected.conv)
    # the projection kernels alone, on sizes that are not multiples of their blocks
    from tests.ops.test_mamba_step import check_norm_in_proj_conv, check_out_proj_residual
    g = torch.Generator().manual_seed(0)
    for (batch, conv_bias, silu), misaligned in zip(((3, True, True), (1, False, False)), (False, True)):
        check_norm_in_proj_conv(batch, torch.float32, "cpu", g, conv_bias, silu, misaligned, given_squares=misaligned)
        check_out_proj_residual(2, torch.float32, "cpu", g, misaligned)

    # the whole block (norm, mixer, residual add) against the unfused block, float32
    lm = tiny_mamba()  # mixers strengthened: greedy decoding does not collapse to one token
    layer = lm.backbone.layers[1]
    mixer = StatefulMambaMixer(layer.mixer)
    for batch in (1, 3):
        state = mixer.allocate(batch)
        state.A.copy_(-torch.exp(layer.mixer.A_log.float()))
        state.dt_bias.copy_(layer.mixer.dt_proj.bias)
        state.ssm.normal_(generator=g)
        state.conv.normal_(generator=g)
        expected_state = copy.deepcopy(state)
        xdbl = torch.zeros(batch, layer.mixer.x_proj.out_features)
        squares = torch.full((2, batch), 7.0)  # any contents: in_proj zeroes the buffer out_proj sums into
        for step in range(4):  # one x_proj accumulator through consecutive steps: each leaves it zero
            residual = torch.randn(batch, lm.config.hidden_size, generator=g)
            want = residual + mixer.step(layer.norm(residual), expected_state)
            # the rows' sums of squares: none (steps 0, 1), reduced in the kernel; given (steps 2, 3)
            squares[0] = residual.pow(2).sum(-1)
            sums = None if step == 0 else (None if step == 1 else squares[0], squares[1])
            mixer.step_block(residual, layer.norm, state, xdbl, sum_squares=sums)
            torch.testing.assert_close(residual, want, rtol=1e-5, atol=1e-5)
            if sums is not None:
                torch.testing.assert_close(squares[1], want.pow(2).sum(-1), rtol=1e-5, atol=1e-5)
                squares[1] = -1.0
            torch.testing.assert_close(state.ssm, expected_state.ssm, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state.conv, expected_state.conv, rtol=1e-5, atol=1e-5)
            assert not xdbl.any()

    # greedy decoding: 1 and 2 sequences (whole-block kernels), 4 (two kernels between cuBLAS projections),
    # 5 (past FUSED_STEP_MAX_BATCH: unfused)
    for batch in (1, 2, 4, 5):
        ids = torch.randint(3, lm.config.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(batch))
        embeds = lm.get_input_embeddings()(ids)
        decoders = [StaticStateDecoder(lm, fused_step=fused) for fused in (False, True)]
        tokens = [d.generate(embeds, max_new_tokens=6, eos_token_id=None) for d in decoders]
        assert decoders[1]._whole_block_steps(batch) == (batch <= 2)
        assert decoders[1]._fused_mixer_steps(batch) == (batch <= 4)
        assert len(set(tokens[0].flatten().tolist())) > 3
        assert torch.equal(tokens[0], tokens[1]), (batch, tokens)
    print("fused step: equal")
    """
)


def test_fused_step_kernels_equal_the_pytorch_step_under_the_interpreter() -> None:
    run_under_triton_interpreter(CHECKS, expect="fused step: equal")


def test_fused_step_is_refused_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="fused_step needs Triton on CUDA"):
        StaticStateDecoder(tiny_vlm().llm, fused_step=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2, 4, 6])
def test_fused_step_on_cuda_replays_in_the_cuda_graph_to_the_unfused_tokens(dtype: torch.dtype, batch: int) -> None:
    """Batches 1 and 2 run the whole-block kernels, 4 the two kernels between cuBLAS's projections, 6 the
    unfused step."""
    from tests.conftest import assert_same_up_to_near_tie

    lm = tiny_mamba().to("cuda", dtype)
    embeds = lm.get_input_embeddings()(torch.randint(3, lm.config.vocab_size, (batch, 33), device="cuda"))
    runs = []
    for fused in (False, True):
        decoder = StaticStateDecoder(lm, fused_step=fused)
        assert decoder.cuda_graph
        with torch.no_grad():
            logits = decoder.prefill(embeds, max_new_tokens=24)
            tokens, seen = [], []
            for _ in range(24):
                seen.append(logits.clone())
                tokens.append(logits.argmax(-1))
                logits = decoder.step(tokens[-1])
        runs.append((torch.stack(tokens, 1), torch.stack(seen, 1)))
    tol = 1e-4 if dtype == torch.float32 else 0.02 * float(runs[0][1].abs().max())
    assert_same_up_to_near_tie(runs[1][0], runs[0][0], runs[0][1], tol)


def test_a_vlms_fused_decode_step_switch_reaches_its_decoder_and_refuses_other_llms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``MambaVLM.set_fused_decode_step``: off by default; on, its static decoder is rebuilt with the fused
    step (which refuses the CPU without the interpreter: the switch reached it); off again, rebuilt
    without. An LLM without Mamba-1 mixers is refused at the switch and by the decoder factory."""
    from mambavlm.generation import build_static_decoder
    from tests.conftest import tiny_llama_vlm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vlm = tiny_vlm()
    assert vlm.static_decoder().fused_step is False
    vlm.set_fused_decode_step()
    with pytest.raises(ValueError, match="fused_step needs Triton on CUDA"):
        vlm.static_decoder()
    vlm.set_fused_decode_step(False)
    assert vlm.static_decoder().fused_step is False
    llama = tiny_llama_vlm()
    with pytest.raises(ValueError, match="runs Mamba-1 mixers; this model's LLM is a LlamaForCausalLM"):
        llama.set_fused_decode_step()
    with pytest.raises(ValueError, match="fused_step runs Mamba-1 mixers; LlamaForCausalLM has none"):
        build_static_decoder(llama.llm, fused_step=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_vlm_switched_to_the_fused_step_generates_the_unfused_tokens_on_cuda() -> None:
    """The tiny MambaVLM (float32) through ``generate_ids``' fast path: the same greedy tokens with the
    fused step as without, and its decoder really steps fused (one sequence: the whole-block kernels)."""
    from tests.conftest import strengthen_mixers

    vlm = tiny_vlm()
    strengthen_mixers(vlm.llm)  # random mixers this small decode one token over and over
    vlm.to("cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(3, vlm.llm.config.vocab_size, (1, 17), device="cuda", generator=generator)
    tokens = []
    for fused in (False, True):
        vlm.set_fused_decode_step(fused)
        tokens.append(vlm.generate_ids(ids, torch.ones_like(ids), fast=True, max_new_tokens=16, eos_token_id=None))
    assert vlm.static_decoder().fused_step and vlm.static_decoder()._whole_block_steps(1)
    assert len(set(tokens[0].flatten().tolist())) > 3
    assert torch.equal(tokens[0], tokens[1])


def test_fused_step_needs_a_mamba_1_model() -> None:
    from mambavlm.generation import HybridStaticDecoder  # noqa: F401  (the LLaMA decoder has no fused step)

    with pytest.raises(TypeError):
        StaticStateDecoder(tiny_llama(), fused_step=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_kernels_on_cuda_equal_pytorch(dtype: torch.dtype) -> None:
    """norm_in_proj_conv and out_proj_residual on sizes that are not multiples of their blocks, against
    RMSNorm (rounded to the weight's dtype) + F.linear + the conv update + x_proj, and residual +
    F.linear(...) rounded first; the weights read through TMA descriptors and, misaligned, through pointers."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for batch in (1, 3):
        for misaligned in (False, True):
            check_norm_in_proj_conv(batch, dtype, "cuda", g, conv_bias=batch == 1, silu=True, misaligned=misaligned,
                                    given_squares=misaligned == (batch == 1))
            check_out_proj_residual(batch, dtype, "cuda", g, misaligned)


def prefetch_target(device: str, g: torch.Generator) -> torch.Tensor:
    """A weight for the projection kernels to prefetch (odd-sized: the last piece is short; asked for
    more bytes than it has); on a Hopper GPU the kernels must really issue the prefetches."""
    from mambavlm.ops.mamba_step import _prefetch_args

    target = torch.randn(1000, 37, device=device, generator=g).to(torch.bfloat16)
    like = torch.empty(1, device=device)
    on = device == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    assert (_prefetch_args(target, 1 << 40, 3, like)["PREFETCH_PIECES"] > 0) == on
    return target


def test_prefetch_shares_cover_the_requested_bytes_once_in_aligned_pieces() -> None:
    """The L2 prefetch's split against hand-worked cases, and, replaying the kernel's arithmetic piece by
    piece, that the programs fetch exactly the first min(nbytes, size) bytes (rounded down to 16), each
    byte once, in pieces of 16-byte multiples at 16-byte offsets, none past the tensor."""
    from mambavlm.ops.mamba_step import L2_PREFETCH_CHUNK, _prefetch_shares

    # 20000 bytes over 3 programs: ceil(20000 / 3) = 6667, rounded up to 16: 6672; one piece each
    assert _prefetch_shares(20000, 6 << 20, 3) == (6672, 20000, 1)
    # 6 MiB of a 25 MiB weight over 640 programs: 9830.4 -> 9840 bytes each, one piece
    assert _prefetch_shares(25 << 20, 6 << 20, 640) == (9840, 6 << 20, 1)
    # 100000 bytes over 2: 50000 each, ceil(50000 / 16384) = 4 pieces (a power of two already)
    assert _prefetch_shares(100000, 1 << 30, 2) == (50000, 100000, 4)
    # 200000 over 2: 100000 each needs 7 pieces, rounded up to 8 (the last one empty)
    assert _prefetch_shares(200000, 200000, 2) == (100000, 200000, 8)
    assert _prefetch_shares(8, 100, 3) == (0, 0, 0)  # under 16 bytes: nothing
    for size, nbytes, programs in [(20000, 6 << 20, 3), (1000, 999, 7), (100000, 100000, 2), (200000, 200000, 2),
                                   (1 << 20, 300000, 640), (5 << 20, 4 << 20, 13)]:
        share, total, pieces = _prefetch_shares(size, nbytes, programs)
        assert total == min(nbytes, size) // 16 * 16 and pieces & (pieces - 1) == 0
        covered = []
        for block in range(programs):  # the kernel: lo = start + i CHUNK, size = clamp(stop - lo, 0, CHUNK)
            start, stop = block * share, min((block + 1) * share, total)
            for i in range(pieces):
                lo = start + i * L2_PREFETCH_CHUNK
                length = max(min(stop - lo, L2_PREFETCH_CHUNK), 0)
                if length:
                    assert lo % 16 == 0 and length % 16 == 0 and lo + length <= size
                    covered.append((lo, lo + length))
        covered.sort()
        assert covered[0][0] == 0 and covered[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), (size, nbytes, programs)


def test_prefetch_is_off_off_hopper_and_refuses_a_strided_tensor() -> None:
    """On the CPU (and under the interpreter) no prefetch is compiled in; a strided tensor is an error
    naming its strides, not a prefetch of the wrong bytes."""
    from mambavlm.ops.mamba_step import _prefetch_args

    weight = torch.randn(64, 32)
    assert _prefetch_args(weight, 1 << 20, 4, weight)["PREFETCH_PIECES"] == 0
    assert _prefetch_args(None, 1 << 20, 4, weight)["PREFETCH_PIECES"] == 0
    with pytest.raises(ValueError, match=r"prefetch must be contiguous, got strides \(1, 32\)"):
        _prefetch_args(weight.t(), 1 << 20, 4, weight)


def misaligned_copy(weight: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``weight`` whose storage starts one element past a 16-byte boundary: the
    projection kernels must read it through pointers, not a TMA descriptor."""
    buffer = torch.empty(weight.numel() + 1, device=weight.device, dtype=weight.dtype)
    copy = buffer[1:].view(weight.shape)
    copy.copy_(weight)
    assert copy.data_ptr() % 16 != 0
    return copy


def check_out_proj_residual(batch: int, dtype: torch.dtype, device: str, g: torch.Generator, misaligned: bool) -> None:
    """``out_proj_residual`` at 1104 -> 50 (not multiples of its blocks; 16-byte rows in float32 and
    bf16) against residual + F.linear(...) rounded to the weight's dtype; it zeroes the buffer it is
    given and sums the new rows' squares; the weight read through a TMA descriptor or, ``misaligned``,
    through pointers."""
    import torch.nn.functional as F

    from mambavlm.ops.mamba_step import _weight_operand, out_proj_residual

    y = torch.randn(batch, 1104, device=device, generator=g).to(dtype)
    w_out = (torch.randn(50, 1104, device=device, generator=g) / 33).to(dtype)
    if misaligned:
        w_out = misaligned_copy(w_out)
    assert _weight_operand("w", w_out, 4, 1024)[1] is not misaligned
    stream = torch.randn(batch, 50, device=device, generator=g)
    expected = stream + F.linear(y, w_out).float()
    zero = torch.ones(batch, 7, device=device)
    squares = torch.zeros(batch, device=device)
    out_proj_residual(y, w_out, stream, zero=zero, prefetch=prefetch_target(device, g), prefetch_bytes=1 << 40,
                      sum_squares=squares)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(stream, expected, **tol)
    torch.testing.assert_close(squares, stream.pow(2).sum(-1), rtol=1e-5, atol=1e-4)  # of the rows it wrote
    assert not zero.any()


def check_norm_in_proj_conv(batch: int, dtype: torch.dtype, device: str, g: torch.Generator, conv_bias: bool,
                            silu: bool, misaligned: bool = False, given_squares: bool = False) -> None:
    """``norm_in_proj_conv`` at D 600, 35 channels (70 in_proj rows: the program of rows 32-47 holds x and z rows),
    a width-4 conv and 7 x_proj rows, against RMSNorm + F.linear + the shifted state's conv + x_proj in
    float32 (tight in float32, bf16 tolerance in bf16); in_proj read through a TMA descriptor or,
    ``misaligned``, through pointers; with ``given_squares`` the norm's sums of squares are given (4x
    the true ones, so the norm must take them) and the kernel zeroes the buffer it is handed."""
    import torch.nn.functional as F

    from mambavlm.ops.mamba_step import _weight_operand, norm_in_proj_conv

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=g) * scale

    residual = rand(batch, 600)
    gain = (rand(600).abs() + 0.5).to(dtype)
    w_in, conv_w, x_proj = rand(70, 600, scale=0.04).to(dtype), rand(35, 4).to(dtype), rand(7, 35, scale=0.2).to(dtype)
    if misaligned:
        w_in = misaligned_copy(w_in)
    assert _weight_operand("w", w_in, 16, 512)[1] is not misaligned
    bias = rand(35).to(dtype) if conv_bias else None
    state = rand(batch, 35, 4).to(dtype)
    xdbl = torch.zeros(batch, 7, device=device)
    want_state = state.clone()
    # with given_squares the kernel takes 4x each row's sum of squares: its rms doubles, its norm halves
    scale = 4.0 if given_squares else 1.0
    normed = residual * torch.rsqrt(scale * residual.pow(2).mean(-1, keepdim=True) + 1e-5)
    xz = F.linear((normed * gain.float()).to(dtype), w_in)
    want_x, want_z = xz.chunk(2, dim=-1)
    want_state = torch.cat([want_state[:, :, 1:], want_x[:, :, None]], dim=-1)
    conv = (want_state.float() * conv_w.float()).sum(-1) + (bias.float() if conv_bias else 0.0)
    conv = F.silu(conv) if silu else conv
    zeroed = torch.full((batch,), 3.0, device=device)
    x, z = norm_in_proj_conv(residual, gain, 1e-5, w_in, state, conv_w, bias, x_proj, silu, xdbl,
                             prefetch=prefetch_target(device, g),
                             sum_squares=scale * residual.pow(2).sum(-1) if given_squares else None,
                             zero_sum_squares=zeroed if given_squares else None)
    assert (zeroed == 0).all() == given_squares
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(z, want_z, **tol)
    torch.testing.assert_close(state, want_state, **tol)
    torch.testing.assert_close(x, conv.to(dtype), **tol)
    torch.testing.assert_close(xdbl, F.linear(conv, x_proj.float()), **tol)


def test_projection_kernels_name_a_mismatched_in_proj_a_batch_and_a_weight_they_cannot_take() -> None:
    from mambavlm.ops.mamba_step import norm_in_proj_conv, out_proj_residual

    conv = (torch.zeros(1, 35, 4), torch.ones(35, 4), None, torch.ones(7, 35), True, torch.zeros(1, 7))
    with pytest.raises(ValueError, match="in_proj has 69 rows; 35 conv channels need 70"):
        norm_in_proj_conv(torch.zeros(1, 600), torch.ones(600), 1e-5, torch.ones(69, 600), *conv)
    with pytest.raises(ValueError, match="at most 4 sequences, got 5"):
        norm_in_proj_conv(torch.zeros(5, 600), torch.ones(600), 1e-5, torch.ones(70, 600), *conv)
    with pytest.raises(ValueError, match=r"in_proj_weight must be contiguous \(row-major\), got strides \(1, 70\)"):
        norm_in_proj_conv(torch.zeros(1, 600), torch.ones(600), 1e-5, torch.ones(600, 70).t(), *conv)
    with pytest.raises(ValueError, match=r"out_proj_weight must be contiguous \(row-major\), got strides \(1, 50\)"):
        out_proj_residual(torch.zeros(1, 35), torch.ones(35, 50).t(), torch.zeros(1, 50))
    with pytest.raises(ValueError, match=r"sum_squares must be a contiguous float32 \(2,\) tensor on cpu, got "
                                         r"torch.float64 \(2,\)"):
        out_proj_residual(torch.zeros(2, 35), torch.ones(50, 35), torch.zeros(2, 50),
                          sum_squares=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"zero_sum_squares must be a contiguous float32 \(1,\) tensor on cpu, got "
                                         r"torch.float32 \(1, 1\)"):
        norm_in_proj_conv(torch.zeros(1, 600), torch.ones(600), 1e-5, torch.ones(70, 600), *conv,
                          zero_sum_squares=torch.zeros(1, 1))


def compiled_for_hopper(kernel: object, types: dict[str, str], constexprs: dict[str, object], num_warps: int) -> str:
    """The kernel compiled for an H100/H200 (sm_90) without a GPU, as Triton's launcher compiles it for
    16-byte-aligned tensors: its TTGIR."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if types.get(name, "").startswith("*")}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ttgir"]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptor"])
@pytest.mark.parametrize("stages", [1, 3])
def test_projection_kernels_stream_their_weights_through_the_pipeline_stages_they_are_given(
    stages: int, tma: bool
) -> None:
    """``num_stages`` must reach the reduction loops. Read through pointers, the weight tiles are plain
    loads with 1 stage and asynchronous copies into shared memory with 3. (Passed as the kernel-level
    option, which pipelines only loads that feed ``tl.dot``, it had compiled to no asynchronous copy at
    all.) Read through a tensor descriptor, they are TMA bulk copies: one in the loop and (stages - 1)
    issued ahead of it. With prefetch pieces (given here with 3 stages) each kernel has the one bulk L2
    prefetch, and none without. Compiled for sm_90 by Triton's own compiler, no GPU needed."""
    from mambavlm.ops import mamba_step as ms

    pieces = 2 if stages == 3 else 0
    prefetch_types = {"prefetch_ptr": "*i8", "prefetch_share": "i32", "prefetch_total": "i32"}

    def weight(block_n: int, block_k: int) -> str:
        return f"tensordesc<bf16[{block_n}, {block_k}]>" if tma else "*bf16"

    out_proj = compiled_for_hopper(
        ms._out_proj_residual_kernel,
        {"y_ptr": "*bf16", "w": weight(4, 1024), "residual_ptr": "*fp32", "zero_ptr": "*fp32", "zero_count": "i32",
         "batch": "i32", "d_out": "i32", "squares_ptr": "*fp32", **prefetch_types},
        {"D_IN": 5120, "B_POW2": 1, "BLOCK_N": 4, "BLOCK_K": 1024, "BLOCK_Z": 256, "STAGES": stages, "TMA": tma,
         "PDL": False, "PREFETCH_PIECES": pieces, "PREFETCH_CHUNK": 16384, "SQUARES_OUT": True},
        num_warps=2,
    )
    in_proj = compiled_for_hopper(
        ms._norm_in_proj_conv_kernel,
        {"residual_ptr": "*fp32", "norm_w_ptr": "*bf16", "w": weight(16, 512), "state_ptr": "*bf16",
         "conv_w_ptr": "*bf16", "conv_b_ptr": "*bf16", "x_proj_ptr": "*bf16", "x_ptr": "*bf16", "z_ptr": "*bf16",
         "xdbl_ptr": "*fp32", "batch": "i32", "channels": "i32", "r2": "i32", "eps": "fp32", "squares_ptr": "*fp32",
         "zero_squares_ptr": "*fp32", **prefetch_types},
        {"D": 2560, "D_POW2": 4096, "B_POW2": 1, "W": 4, "W_POW2": 4, "HAS_BIAS": True, "SILU": True, "BLOCK_R": 256,
         "BLOCK_N": 16, "BLOCK_K": 512, "STAGES": stages, "TMA": tma, "PDL": False, "PREFETCH_PIECES": pieces,
         "PREFETCH_CHUNK": 16384, "SQUARES_IN": True, "ZERO_SQUARES": True},
        num_warps=2,
    )
    for ttgir in (out_proj, in_proj):
        assert ttgir.count("cp.async.bulk.prefetch.L2.global") == (pieces > 0)
        bulk = ttgir.count("ttng.async_tma_copy_global_to_local")
        if tma:
            assert bulk == stages, bulk
        else:
            copies = ttgir.count("ttg.async_copy_global_to_local")
            assert bulk == 0 and (copies > 0) == (stages > 1), copies
