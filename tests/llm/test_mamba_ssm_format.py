"""Checkpoints in mamba_ssm's format: configs translated to transformers' (hand-computed fields, what
cannot be represented), weights loaded with identical logits, corrupted checkpoints named."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Mamba2Config, MambaConfig, MambaForCausalLM

from mambavlm.config import LLMConfig
from mambavlm.llm.factory import build_llm
from mambavlm.llm.mamba2_lm import SSDForCausalLM
from mambavlm.llm.mamba_ssm_format import (
    MambaSsmCheckpointError,
    is_mamba_ssm_checkpoint,
    mamba_ssm_config_to_hf,
)
from tests.conftest import (
    PADDED_VOCAB,
    RAW_VOCAB,
    TINY_MAMBA,
    TINY_MAMBA2,
    TINY_MAMBA2_SSM_CONFIG,
    TINY_MAMBA_SSM_CONFIG,
    count_parameters,
    logits,
    make_model,
    write_mamba_ssm_dir,
)


@pytest.mark.parametrize(
    ("family", "model_cls", "hf_config", "ssm_config", "weights_file"),
    [
        ("mamba", MambaForCausalLM, TINY_MAMBA, TINY_MAMBA_SSM_CONFIG, "pytorch_model.bin"),
        ("mamba2", SSDForCausalLM, TINY_MAMBA2, TINY_MAMBA2_SSM_CONFIG, "model.safetensors"),
    ],
)
def test_mamba_ssm_checkpoint_loads_with_identical_logits(
    tmp_path, family, model_cls, hf_config, ssm_config, weights_file
):
    """A model written in mamba_ssm's key layout and config loads back with the same logits (the Mamba-2
    reference is this package's own LM: tests/llm/test_mamba2_lm.py holds it against transformers' and
    mamba_ssm's, and transformers <= 5.17 normalises the gated norm of these 2 groups differently)."""
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
