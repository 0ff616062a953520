"""The fused Mamba-1 step kernels (``mambavlm.ops.mamba_step``) against the PyTorch step, run by Triton's
interpreter on the CPU (a subprocess: ``TRITON_INTERPRET`` is read when Triton loads), and on CUDA."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from mambavlm.generation import StaticStateDecoder
from mambavlm.ops.mamba_step import triton_available
from tests.conftest import ROOT, subprocess_env, tiny_llama, tiny_mamba, tiny_vlm

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
        for batch in (1, 3):
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
    lm = tiny_mamba()  # mixers strengthened: greedy decoding does not collapse to one token
    embeds = lm.get_input_embeddings()(torch.randint(3, lm.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)))
    tokens = [StaticStateDecoder(lm, fused_step=fused).generate(embeds, max_new_tokens=12, eos_token_id=None)
              for fused in (False, True)]
    assert len(set(tokens[0].flatten().tolist())) > 3
    assert torch.equal(tokens[0], tokens[1]), tokens
    print("fused step: equal")
    """
)


def test_fused_step_kernels_equal_the_pytorch_step_under_the_interpreter() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECKS], cwd=ROOT, env=subprocess_env(TRITON_INTERPRET="1"),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fused step: equal" in result.stdout


def test_fused_step_is_refused_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="fused_step needs Triton on CUDA"):
        StaticStateDecoder(tiny_vlm().llm, fused_step=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_on_cuda_replays_in_the_cuda_graph_to_the_unfused_tokens(dtype: torch.dtype) -> None:
    from tests.conftest import assert_same_up_to_near_tie

    lm = tiny_mamba().to("cuda", dtype)
    embeds = lm.get_input_embeddings()(torch.randint(3, lm.config.vocab_size, (4, 33), device="cuda"))
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


def test_fused_step_needs_a_mamba_1_model() -> None:
    from mambavlm.generation import HybridStaticDecoder  # noqa: F401  (the LLaMA decoder has no fused step)

    with pytest.raises(TypeError):
        StaticStateDecoder(tiny_llama(), fused_step=True)
