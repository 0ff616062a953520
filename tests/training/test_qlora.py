"""QLoRA on CUDA (bitsandbytes): the LLM's linear layers become 4-bit except those the fused Mamba
kernel reads raw, the model keeps its training mode, so transformers' Mamba mixer takes mamba_ssm's
fused training kernel as in bf16 training, only adapters and projector train, and the loss falls."""

from __future__ import annotations

import pytest
import torch

from mambavlm.training.config import LoraSettings
from tests.conftest import fixed_batch, tiny_vlm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_qlora_trains_through_the_fused_kernel_on_a_4_bit_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    mamba_ssm_interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    from transformers.models.mamba import modeling_mamba

    from mambavlm.training.lora import LoraTrainable, apply_lora
    
    model = tiny_vlm(train=True)
    batch = {k: (v.to("cuda") if torch.is_tensor(v) else [p.to("cuda", torch.bfloat16) for p in v])
             for k, v in fixed_batch(model).items()}
    model = model.to("cuda", torch.bfloat16)
    assert model.training
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, qlora=True)
    apply_lora(model, settings)
    assert model.llm.training
    modules = dict(model.llm.named_modules())
    in_proj = [m for n, m in modules.items() if n.endswith("mixer.in_proj.base_layer")]
    out_proj = [m for n, m in modules.items() if n.endswith("mixer.out_proj")]
    assert in_proj and all(isinstance(m, bnb.nn.Linear4bit) for m in in_proj)
    assert out_proj and not any(isinstance(m, bnb.nn.Linear4bit) for m in out_proj)

    calls = []
    fused = mamba_ssm_interface.mamba_inner_fn

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", counting, raising=False)
    names = LoraTrainable(settings)(model)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n in names], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert len(calls) == 8 * model.llm.config.num_hidden_layers
    assert losses[-1] < losses[0] - 0.1, losses
