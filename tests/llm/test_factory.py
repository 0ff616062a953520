"""The LLM factory: HF directories (logits, config overrides, missing weights), random and meta-device
builds with hand-counted parameters, family checks and clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from mambavlm.config import LLMConfig
from mambavlm.llm.factory import LLMBuildError, build_llm, llm_hidden_size
from tests.conftest import (
    RAW_VOCAB,
    TINY_MAMBA,
    TINY_MAMBA2,
    TINY_MAMBA2_SSM_CONFIG,
    TINY_MAMBA_SSM_CONFIG,
    count_parameters,
    logits,
    make_model,
    tiny_llama_config,
    write_mamba_ssm_dir,
)


# The shared tiny LLaMA with 2 layers, this file's vocabulary and transformers' default max_position_embeddings.
TINY_LLAMA = tiny_llama_config(num_hidden_layers=2, vocab_size=RAW_VOCAB, max_position_embeddings=2048)


@pytest.mark.parametrize(
    ("family", "model_cls", "config"),
    [("mamba", MambaForCausalLM, TINY_MAMBA), ("llama", LlamaForCausalLM, TINY_LLAMA)],
)
def test_hf_save_pretrained_dir_loads_with_identical_logits(tmp_path, family, model_cls, config):
    original = make_model(model_cls, config)
    original.save_pretrained(tmp_path / "hf")

    loaded = build_llm(LLMConfig(family=family, source=str(tmp_path / "hf")))

    assert type(loaded) is model_cls
    torch.testing.assert_close(logits(loaded), logits(original), atol=1e-5, rtol=0)


def test_hf_dir_config_overrides_are_applied(tmp_path):
    make_model(LlamaForCausalLM, TINY_LLAMA).save_pretrained(tmp_path / "hf")

    overrides = {"rms_norm_eps": 1e-3, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    loaded = build_llm(LLMConfig(family="llama", source=str(tmp_path / "hf"), config=overrides))

    assert loaded.model.norm.variance_epsilon == 1e-3
    assert loaded.model.rotary_emb.inv_freq[1].item() == pytest.approx(5e5 ** (-2 / 8))  # head_dim 8
    # A misspelt field, and a legacy one transformers would drop here, are errors instead of no-ops.
    for bad in ({"rms_norm_epsilon": 1e-3}, {"rope_theta": 5e5}):
        with pytest.raises(LLMBuildError, match=next(iter(bad))):
            build_llm(LLMConfig(family="llama", source=str(tmp_path / "hf"), config=bad))


def test_hf_dir_with_a_missing_weight_is_an_error_naming_it(tmp_path):
    make_model(LlamaForCausalLM, TINY_LLAMA).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})

    with pytest.raises(LLMBuildError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        build_llm(LLMConfig(family="llama", source=str(tmp_path / "hf")))


def test_random_init_from_config_has_hand_counted_parameters():
    cfg = LLMConfig(
        family="mamba",
        config={"hidden_size": 16, "num_hidden_layers": 1, "vocab_size": 24, "state_size": 4},
    )
    model = build_llm(cfg)
    # d=16, inner=32, dt_rank=ceil(16/16)=1, state=4, conv kernel 4, tied lm_head.
    embedding = 24 * 16
    in_proj = 16 * 2 * 32
    conv1d = 32 * 4 + 32
    x_proj = 32 * (1 + 2 * 4)
    dt_proj = 1 * 32 + 32
    a_log, d_skip = 32 * 4, 32
    out_proj = 32 * 16
    norms = 16 + 16
    expected = embedding + in_proj + conv1d + x_proj + dt_proj + a_log + d_skip + out_proj + norms
    assert type(model) is MambaForCausalLM
    assert count_parameters(model) == expected == 2624
    assert llm_hidden_size(model) == 16


def test_meta_build_of_mamba_2_8b_counts_parameters_without_memory():
    cfg = LLMConfig(
        family="mamba", config={"hidden_size": 2560, "num_hidden_layers": 64, "vocab_size": 50280}
    )
    with torch.device("meta"):
        model = build_llm(cfg, load_weights=False)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == pytest.approx(2.77e9, rel=0.01)
    assert llm_hidden_size(model) == 2560


def test_meta_build_of_vicuna_7b_counts_parameters_without_memory():
    cfg = LLMConfig(
        family="llama",
        source="lmsys/vicuna-7b-v1.5",
        config={
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "intermediate_size": 11008,
            "vocab_size": 32000,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
        dtype="float16",
    )
    with torch.device("meta"):
        model = build_llm(cfg, load_weights=False)
    assert all(p.is_meta for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    # 2 * 32000 * 4096 (untied embeddings) + 32 * (4 * 4096^2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert count_parameters(model) == 6_738_415_616
    assert count_parameters(model) == pytest.approx(6.74e9, rel=0.001)


def test_architecture_only_build_from_hf_dir_uses_its_config(tmp_path):
    TINY_LLAMA.save_pretrained(tmp_path / "hf")
    with torch.device("meta"):
        model = build_llm(LLMConfig(family="llama", source=str(tmp_path / "hf")), load_weights=False)
    assert (model.config.hidden_size, model.config.intermediate_size) == (32, 64)
    assert count_parameters(model) == count_parameters(LlamaForCausalLM(TINY_LLAMA))


def test_family_mismatch_is_an_error(tmp_path):
    make_model(LlamaForCausalLM, TINY_LLAMA).save_pretrained(tmp_path / "hf")
    with pytest.raises(LLMBuildError, match="'llama' model but llm.family is 'mamba'"):
        build_llm(LLMConfig(family="mamba", source=str(tmp_path / "hf")))

    original = make_model(Mamba2ForCausalLM, TINY_MAMBA2)
    path = write_mamba_ssm_dir(original, TINY_MAMBA2_SSM_CONFIG, tmp_path / "ckpt", "model.safetensors")
    with pytest.raises(LLMBuildError, match="'mamba2' model but llm.family is 'mamba'"):
        build_llm(LLMConfig(family="mamba", source=str(path)))


def test_bad_llm_configs_are_clear_errors(tmp_path):
    with pytest.raises(LLMBuildError, match="hiden_size"):
        build_llm(LLMConfig(family="mamba", config={"hiden_size": 32}))
    path = write_mamba_ssm_dir(
        make_model(MambaForCausalLM, TINY_MAMBA),
        TINY_MAMBA_SSM_CONFIG,
        tmp_path / "ckpt",
        "pytorch_model.bin",
    )
    with pytest.raises(LLMBuildError, match="use_mamba_py"):
        build_llm(LLMConfig(family="mamba", source=str(path), config={"use_mamba_py": True}))
    with pytest.raises(LLMBuildError, match="llm.config is empty"):
        build_llm(LLMConfig(family="mamba", source="state-spaces/mamba-2.8b-hf"), load_weights=False)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_llm(LLMConfig(family="mamba", source=str(tmp_path / "missing")))


def test_mamba_training_without_causal_conv1d_fails_early(monkeypatch) -> None:
    """mamba_ssm without causal_conv1d would assert inside transformers' fused training op."""
    from mambavlm.llm import factory
    from mambavlm.ops import dispatch

    llm = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4))
    cuda = torch.device("cuda")
    monkeypatch.setattr(dispatch, "kernels_available", lambda: {"mamba_ssm": True, "causal_conv1d": False})
    with pytest.raises(RuntimeError, match="needs causal_conv1d too"):
        factory.check_mamba_training_kernels(llm, cuda)
    factory.check_mamba_training_kernels(llm, torch.device("cpu"))  # the PyTorch path needs neither
    monkeypatch.setattr(dispatch, "kernels_available", lambda: {"mamba_ssm": True, "causal_conv1d": True})
    factory.check_mamba_training_kernels(llm, cuda)
