"""LoRA through peft: only the adapters (and the projector, as configured) train, the loss falls,
saved adapters reload to the same logits, merging gives the adapter model's logits in a plain
MambaVLM, the merge command writes it, and the targets the fused Mamba kernel bypasses are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from mambavlm.config import ConfigError  # noqa: E402
from mambavlm.model import MambaVLM  # noqa: E402
from mambavlm.training import load_train_config, run_finetune  # noqa: E402
from mambavlm.training.config import LoraSettings  # noqa: E402
from mambavlm.training.finetune import FINAL_ADAPTER_DIR  # noqa: E402
from mambavlm.training.lora import (  # noqa: E402
    LoraTrainable,
    apply_lora,
    load_adapter,
    merge_adapter,
    save_adapter,
    target_modules,
)
from tests.conftest import ROOT, TINY_TRAIN, fixed_batch, tiny_vlm  # noqa: E402
from tests.training.test_finetune import MICRO_RUN  # noqa: E402

pytestmark = pytest.mark.usefixtures("on_cpu")


@pytest.mark.parametrize("projector", ["full", "lora", "frozen"])
def test_only_the_adapters_and_the_configured_projector_train_and_the_loss_falls(projector: str) -> None:
    model = tiny_vlm(train=True)
    base_llm = {k: v.clone() for k, v in model.llm.state_dict().items()}
    base_projector = {k: v.clone() for k, v in model.projector.state_dict().items()}
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, projector=projector)
    apply_lora(model, settings)
    names = LoraTrainable(settings)(model)
    llm_names = {n for n in names if n.startswith("llm.")}
    assert llm_names and all(".lora_A." in n or ".lora_B." in n for n in llm_names)
    assert all(".mixer.in_proj." in n for n in llm_names)  # the Mamba family's default target
    projector_names = {n for n in names if n.startswith("projector.")}
    if projector == "full":
        assert projector_names == {f"projector.{k}" for k, _ in model.projector.named_parameters()}
    elif projector == "lora":
        assert projector_names and all("lora_" in n for n in projector_names)
    else:
        assert not projector_names
    assert not any(n.startswith("vision.") for n in names)
    batch = fixed_batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses
    for key, value in model.llm.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base_llm[key.replace(".base_layer", "")]), key
    if projector == "frozen":
        assert all(torch.equal(model.projector.state_dict()[k], v) for k, v in base_projector.items())


@pytest.mark.parametrize("projector", ["full", "lora"])
def test_saved_adapters_reload_and_merge_to_the_adapter_models_logits(tmp_path: Path, projector: str) -> None:
    model = tiny_vlm(train=True)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, projector=projector)
    apply_lora(model, settings)
    with torch.no_grad():  # trained-looking adapters: B is zero at initialisation
        for name, param in model.named_parameters():
            if "lora_B" in name or (projector == "full" and name.startswith("projector.")):
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    batch = fixed_batch(model)
    with torch.no_grad():
        expected = model(**batch).logits
    save_adapter(model, settings, tmp_path / "adapter")
    stored = json.loads((tmp_path / "adapter" / "llm_adapter" / "adapter_config.json").read_text())
    assert stored["r"] == 4 and stored["target_modules"] == ["in_proj"]

    base = tiny_vlm()
    assert load_adapter(base, tmp_path / "adapter") == settings
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(**batch).logits, expected, rtol=0, atol=0)
    merge_adapter(base, settings)
    assert type(base.llm).__name__ == "MambaForCausalLM"
    assert not any("lora_" in n for n, _ in base.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    base.save_pretrained(tmp_path / "merged")
    merged = MambaVLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_lora_run_writes_adapters_and_the_merge_command_a_full_model(tmp_path: Path, capsys) -> None:
    """The merge command takes the run's output_dir (its final_adapter/ found) and refuses, in one line,
    a full model and a directory without adapters."""
    out = tmp_path / "run"
    config = load_train_config(
        TINY_TRAIN, [f"output_dir={out}", *MICRO_RUN, "lora={r: 4, alpha: 8, dropout: 0.0}", "train.save_every=null"]
    )
    metrics = run_finetune(config)
    assert metrics["step_losses"][-1] < metrics["step_losses"][0]
    adapter = out / FINAL_ADAPTER_DIR
    assert (adapter / "llm_adapter" / "adapter_model.safetensors").is_file() and not (out / "final").exists()
    sys.path.insert(0, str(ROOT / "train"))
    try:
        import merge_lora
    finally:
        sys.path.remove(str(ROOT / "train"))
    merged_dir = merge_lora.main([str(out), "--out", str(tmp_path / "merged")])
    # a second merge into a folder that holds something is refused (it was overwritten silently) unless
    # --overwrite asks for it
    before = sorted(p.name for p in merged_dir.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        merge_lora.main([str(out), "--out", str(merged_dir)])
    assert exit_info.value.code == 2
    assert f"error: --out {merged_dir} already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert merge_lora.main([str(out), "--out", str(merged_dir), "--overwrite"]) == merged_dir
    assert sorted(p.name for p in merged_dir.iterdir()) == before
    merged = MambaVLM.from_pretrained(merged_dir).eval()
    (tmp_path / "empty").mkdir()
    for given, says in ((merged_dir, "holds a full model, not LoRA adapters"), (tmp_path / "empty", "holds no LoRA adapters")):
        with pytest.raises(SystemExit) as exit_info:
            merge_lora.main([str(given), "--out", str(tmp_path / "again")])
        assert exit_info.value.code == 2 and f"error: {given} {says}" in capsys.readouterr().err
    assert (adapter / "base" / "config.json").is_file()  # the tiny config's LLM is random: the base is kept
    base = MambaVLM.from_pretrained(adapter / "base")
    load_adapter(base, adapter)
    batch = fixed_batch(base)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, base.eval()(**batch).logits, rtol=1e-5, atol=1e-5)
    # a --base of another LLM width: one error line naming the adapter and the first mismatch (it was
    # load_state_dict's traceback, a line per tensor)
    tiny_vlm("llm.config.hidden_size=96").save_pretrained(tmp_path / "wider")
    with pytest.raises(SystemExit) as exit_info:
        merge_lora.main([str(out), "--base", str(tmp_path / "wider"), "--out", str(tmp_path / "wrong")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot load the adapter {adapter} onto this base: its LLM is not the one the "
                           "adapters were trained on (size mismatch for ")
    assert not (tmp_path / "wrong").exists()


def test_targets_the_fused_mamba_kernel_bypasses_are_refused_and_qlora_needs_cuda(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match=r"\['out_proj', 'x_proj'\] of a Mamba-1 LLM"):
        target_modules(LoraSettings(target_modules=["in_proj", "x_proj", "out_proj"]), "mamba")
    with pytest.raises(ValueError, match="would not train"):
        target_modules(LoraSettings(target_modules="all-linear"), "mamba")
    assert target_modules(LoraSettings(), "llama") == "all-linear"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs CUDA: set lora.qlora=false on this machine"):
            apply_lora(tiny_vlm(), LoraSettings(qlora=True))
    # both through the train script: one error line each, not a traceback
    sys.path.insert(0, str(ROOT / "train"))
    try:
        import finetune as finetune_script
    finally:
        sys.path.remove(str(ROOT / "train"))
    mamba1 = f"model={ROOT / 'configs/model/tiny.yaml'}"  # the train config's tiny LLM is a Mamba-2
    refused = [([mamba1, "lora={r: 4, target_modules: [x_proj]}"], "error: lora.target_modules ['x_proj']: "
                "['x_proj'] of a Mamba-1 LLM are read as raw weights")]
    if not torch.cuda.is_available():
        refused.append((["lora={r: 4, qlora: true}"], "error: lora.qlora: true loads the LLM in 4 bit"))
    for override, says in refused:  # override: a list of key=value
        with pytest.raises(SystemExit) as exit_info:
            finetune_script.main(["--config", str(TINY_TRAIN), f"output_dir={tmp_path / 'run'}", *override])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(says)


def test_target_modules_no_layer_has_are_a_config_error_before_the_data(tmp_path: Path, capsys) -> None:
    """A fresh user's x_proj on a Mamba-2 LLM ended in peft's traceback after the synthetic data was
    written: now one error line naming the missing target and the LLM's linear layers, nothing written."""
    from mambavlm.config import ConfigError
    from mambavlm.training.lora import check_targets_exist

    llm = tiny_vlm().llm
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear)})
    check_targets_exist(llm, [linear[0]])
    check_targets_exist(llm, "all-linear")
    with pytest.raises(ConfigError, match=rf"\['q_projj'\] name no module of the {type(llm).__name__}; "
                       rf"its linear layers are \[{', '.join(repr(n) for n in linear)}\]"):
        check_targets_exist(llm, [linear[0], "q_projj"])
    sys.path.insert(0, str(ROOT / "train"))
    try:
        import finetune as finetune_script
    finally:
        sys.path.remove(str(ROOT / "train"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        finetune_script.main(["--config", str(TINY_TRAIN), f"output_dir={out}", "lora={r: 4, target_modules: [q_projj]}"])
    assert exit_info.value.code == 2
    assert "error: lora.target_modules: ['q_projj'] name no module" in capsys.readouterr().err
    assert not (out / "data").exists()
