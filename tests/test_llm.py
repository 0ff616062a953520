"""LLM factory and mamba_ssm checkpoint conversion, checked against transformers models built here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
)

from mambavlm.config import LLMConfig
from mambavlm.llm.factory import LLMBuildError, build_llm, llm_hidden_size
from mambavlm.llm.mamba2_lm import SSDForCausalLM
from mambavlm.llm.mamba_ssm_format import (
    MambaSsmCheckpointError,
    is_mamba_ssm_checkpoint,
    mamba_ssm_config_to_hf,
)

# Unpadded vocabulary of the tiny checkpoints; mamba_ssm pads it to a multiple of 8 -> 104.
RAW_VOCAB = 100
PADDED_VOCAB = 104

TINY_MAMBA = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=PADDED_VOCAB, state_size=8)
TINY_MAMBA_SSM_CONFIG = {
    "d_model": 32,
    "n_layer": 2,
    "vocab_size": RAW_VOCAB,
    "ssm_cfg": {"d_state": 8},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
TINY_MAMBA2 = Mamba2Config(
    hidden_size=32,
    num_hidden_layers=2,
    vocab_size=PADDED_VOCAB,
    num_heads=4,
    head_dim=16,
    n_groups=2,
    state_size=8,
    chunk_size=8,
    tie_word_embeddings=False,
)
TINY_MAMBA2_SSM_CONFIG = {
    "d_model": 32,
    "d_intermediate": 0,
    "n_layer": 2,
    "vocab_size": RAW_VOCAB,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": False,
}
TINY_LLAMA = LlamaConfig(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    vocab_size=RAW_VOCAB,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def make_model(model_cls: type[PreTrainedModel], config) -> PreTrainedModel:
    """A random model in eval mode whose every parameter is perturbed, so no two weights coincide."""
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def logits(model: PreTrainedModel, vocab: int = RAW_VOCAB) -> torch.Tensor:
    """Logits (2, 12, V) for fixed token ids (12 > chunk_size, so Mamba-2 scans several chunks)."""
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def write_mamba_ssm_dir(model: PreTrainedModel, config_json: dict, path: Path, weights_file: str) -> Path:
    """Write ``model`` as mamba_ssm saves: its key names, config.json, torch.save or safetensors."""
    path.mkdir()
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("backbone.embeddings."):
            key = key.replace("backbone.embeddings.", "backbone.embedding.", 1)
        state[key] = tensor.detach().clone().contiguous()
    if weights_file == "pytorch_model.bin":
        torch.save(state, path / weights_file)
    else:
        save_file(state, path / weights_file)
    (path / "config.json").write_text(json.dumps(config_json))
    return path


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("family", "model_cls", "hf_config", "ssm_config", "weights_file"),
    [
        ("mamba", MambaForCausalLM, TINY_MAMBA, TINY_MAMBA_SSM_CONFIG, "pytorch_model.bin"),
        ("mamba2", Mamba2ForCausalLM, TINY_MAMBA2, TINY_MAMBA2_SSM_CONFIG, "model.safetensors"),
    ],
)
def test_mamba_ssm_checkpoint_loads_with_identical_logits(
    tmp_path, family, model_cls, hf_config, ssm_config, weights_file
):
    """The reference is transformers' own model; the mamba2 family loads into ours (SSDForCausalLM)."""
    original = make_model(model_cls, hf_config)
    path = write_mamba_ssm_dir(original, ssm_config, tmp_path / "ckpt", weights_file)
    assert is_mamba_ssm_checkpoint(path)

    loaded = build_llm(LLMConfig(family=family, source=str(path)))

    assert type(loaded) is {"mamba": MambaForCausalLM, "mamba2": SSDForCausalLM}[family]
    assert loaded.config.vocab_size == PADDED_VOCAB
    assert loaded.config.tie_word_embeddings == ssm_config["tie_embeddings"]
    assert not loaded.training
    torch.testing.assert_close(logits(loaded), logits(original), atol=1e-5, rtol=0)
    if ssm_config["tie_embeddings"]:
        assert loaded.lm_head.weight is loaded.backbone.embeddings.weight


def test_mamba_ssm_checkpoint_loads_in_bfloat16(tmp_path):
    original = make_model(MambaForCausalLM, TINY_MAMBA)
    path = write_mamba_ssm_dir(original, TINY_MAMBA_SSM_CONFIG, tmp_path / "ckpt", "pytorch_model.bin")

    loaded = build_llm(LLMConfig(family="mamba", source=str(path), dtype="bfloat16"))

    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    expected = original.state_dict()["backbone.layers.1.mixer.x_proj.weight"].to(torch.bfloat16)
    torch.testing.assert_close(loaded.backbone.layers[1].mixer.x_proj.weight, expected, atol=0, rtol=0)


def test_mamba_ssm_slimpj_config_translates_to_hand_computed_fields():
    # config.json of state-spaces/mamba-2.8b-slimpj.
    slimpj = {
        "d_model": 2560,
        "n_layer": 64,
        "vocab_size": 50277,
        "ssm_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
    }
    config = mamba_ssm_config_to_hf(slimpj)
    assert isinstance(config, MambaConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (2560, 64, 50280)
    assert (config.state_size, config.conv_kernel, config.intermediate_size) == (16, 4, 5120)
    assert config.time_step_rank == 160  # ceil(2560 / 16)
    assert config.tie_word_embeddings and config.residual_in_fp32
    assert (config.use_bias, config.use_conv_bias) == (False, True)


def test_mamba2_ssm_config_translates_to_hand_computed_fields():
    # config.json of state-spaces/mamba2-2.8b.
    mamba2 = {
        "d_model": 2560,
        "d_intermediate": 0,
        "n_layer": 64,
        "vocab_size": 50277,
        "ssm_cfg": {"layer": "Mamba2"},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": True,
    }
    config = mamba_ssm_config_to_hf(mamba2)
    assert isinstance(config, Mamba2Config)
    assert config.vocab_size == 50288
    assert (config.num_heads, config.head_dim, config.state_size) == (80, 64, 128)  # 2 * 2560 / 64 heads
    assert (config.n_groups, config.chunk_size, config.conv_kernel, config.expand) == (1, 256, 4, 2)
    assert tuple(config.time_step_limit) == (0.0, math.inf)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_intermediate": 128}, "MLP layers"),
        ({"attn_layer_idx": [1]}, "attention layers"),
        ({"rms_norm": False}, "LayerNorm"),
        ({"ssm_cfg": {"layer": "Mamba2", "headdim": 16, "D_has_hdim": True}}, "D_has_hdim"),
        ({"ssm_cfg": {"d_stat": 8}}, "d_stat"),
        ({"n_layers": 2}, "n_layers"),
    ],
)
def test_mamba_ssm_config_rejects_what_transformers_cannot_represent(change, message):
    with pytest.raises(MambaSsmCheckpointError, match=message):
        mamba_ssm_config_to_hf({**TINY_MAMBA_SSM_CONFIG, **change})


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


def test_meta_build_from_mamba_ssm_config_dir_reads_and_pads_the_architecture(tmp_path):
    path = tmp_path / "slimpj"
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"d_model": 2560, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {}})
    )
    with torch.device("meta"):
        model = build_llm(LLMConfig(family="mamba", source=str(path)), load_weights=False)
    assert model.config.vocab_size == 50280
    assert count_parameters(model) == pytest.approx(2.77e9, rel=0.01)


def test_architecture_only_build_from_hf_dir_uses_its_config(tmp_path):
    TINY_LLAMA.save_pretrained(tmp_path / "hf")
    with torch.device("meta"):
        model = build_llm(LLMConfig(family="llama", source=str(tmp_path / "hf")), load_weights=False)
    assert (model.config.hidden_size, model.config.intermediate_size) == (32, 64)
    assert count_parameters(model) == count_parameters(LlamaForCausalLM(TINY_LLAMA))


def test_corrupted_mamba_ssm_checkpoint_names_the_parameter_and_shapes(tmp_path):
    original = make_model(MambaForCausalLM, TINY_MAMBA)
    path = write_mamba_ssm_dir(original, TINY_MAMBA_SSM_CONFIG, tmp_path / "ckpt", "pytorch_model.bin")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["backbone.layers.1.mixer.dt_proj.weight"] = torch.zeros(64, 3)
    state["backbone.layers.0.mixer.extra"] = torch.zeros(1)
    del state["backbone.norm_f.weight"]
    torch.save(state, path / "pytorch_model.bin")

    with pytest.raises(MambaSsmCheckpointError) as err:
        build_llm(LLMConfig(family="mamba", source=str(path)))
    message = str(err.value)
    assert "backbone.layers.1.mixer.dt_proj.weight: checkpoint (64, 3) vs model (64, 2)" in message
    assert "missing: backbone.norm_f.weight" in message
    assert "unexpected: backbone.layers.0.mixer.extra" in message


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_saved_by_mamba_ssm_matches_its_logits(tmp_path):
    mixer_seq_simple = pytest.importorskip("mamba_ssm.models.mixer_seq_simple")
    config_mamba = pytest.importorskip("mamba_ssm.models.config_mamba")
    torch.manual_seed(0)
    reference = mixer_seq_simple.MambaLMHeadModel(
        config_mamba.MambaConfig(d_model=64, n_layer=2, vocab_size=RAW_VOCAB, ssm_cfg={"d_state": 8}),
        device="cuda",
    ).eval()
    reference.save_pretrained(str(tmp_path / "ckpt"))

    loaded = build_llm(LLMConfig(family="mamba", source=str(tmp_path / "ckpt"))).to("cuda")

    ids = torch.randint(0, RAW_VOCAB, (2, 12), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=1e-3, rtol=1e-3)


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
