"""QLoRA on CUDA (bitsandbytes): the LLM's linear layers become 4-bit except those the training mixers
read raw, the model keeps its training mode, so the mixers train in mamba_ssm's layout through the
default Triton scan or mamba_ssm's fused ``mamba_inner_fn`` (the 4-bit ``in_proj`` with its adapter
called as a module), only adapters and projector train, and the loss falls."""

from __future__ import annotations

import pytest
import torch

from mambavlm.training.config import LoraSettings
from tests.conftest import fixed_batch, tiny_vlm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("scan", ["auto", "mamba_ssm"])
def test_qlora_trains_through_the_training_scan_on_a_4_bit_llm(scan: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    mamba_ssm_interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    import mambavlm.llm.mamba_training as training
    from mambavlm.training.lora import LoraTrainable, apply_lora

    model = tiny_vlm(train=True)
    batch = {k: (v.to("cuda") if torch.is_tensor(v) else [p.to("cuda", torch.bfloat16) for p in v])
             for k, v in fixed_batch(model).items()}
    model = model.to("cuda", torch.bfloat16)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, qlora=True)
    apply_lora(model, settings)
    assert model.llm.training
    modules = dict(model.llm.named_modules())
    in_proj = [m for n, m in modules.items() if n.endswith("mixer.in_proj.base_layer")]
    out_proj = [m for n, m in modules.items() if n.endswith("mixer.out_proj")]
    assert in_proj and all(isinstance(m, bnb.nn.Linear4bit) for m in in_proj)
    assert out_proj and not any(isinstance(m, bnb.nn.Linear4bit) for m in out_proj)
    training.use_training_scan(model.llm.get_base_model(), scan)

    calls = []
    owner, name = (training, "selective_scan_triton") if scan == "auto" else (mamba_ssm_interface, "mamba_inner_fn")
    kernel = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or kernel(*a, **k))
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
