"""Distillation configs: stage settings checked, the shipped configs (HoVLE interval 4, MaTVLM 25 %, tiny)
load with their hand-written values and round-trip."""

from __future__ import annotations

import pytest

from mambavlm.config import ConfigError
from mambavlm.distill.config import DistillConfig, DistillStageConfig, load_distill_config
from tests.conftest import ROOT


def test_stage_and_distill_configs() -> None:
    with pytest.raises(ValueError, match="alpha weigh the matvlm loss"):
        DistillStageConfig(name="stage1", max_steps=1, lr=1e-3, alpha=0.5)
    with pytest.raises(ValueError, match="warmup_ratio \\+ decay_ratio"):
        DistillStageConfig(name="stage2", max_steps=1, lr=1e-3, warmup_ratio=0.6, decay_ratio=0.5)
    with pytest.raises(ValueError, match="no loss"):
        DistillStageConfig(name="matvlm", max_steps=1, lr=1e-3, alpha=0, beta=0)
    data = ["data.train=x.json"]
    hovle = load_distill_config(ROOT / "configs/distill/hovle-interval4.yaml", data)
    assert [s.name for s in hovle.stages] == ["stage1", "stage2", "stage3"]
    assert [s.lr for s in hovle.stages] == [1e-3, 5e-4, 5e-5]
    assert hovle.layout.attention_layers(32) == [0, 4, 8, 12, 16, 20, 24, 28]
    matvlm = load_distill_config(ROOT / "configs/distill/matvlm-25.yaml", data)
    assert [s.name for s in matvlm.stages] == ["matvlm"] and matvlm.seeding == "matvlm"
    assert matvlm.layout.mamba_layers(32) == [0, 4, 8, 12, 16, 20, 24, 28]
    tiny = load_distill_config(ROOT / "configs/distill/tiny.yaml", ["layout=linear", "stages.2.lr=1e-4"])
    assert tiny.layout.mamba_layers(4) == [0, 1, 2, 3] and tiny.stages[2].lr == 1e-4
    assert DistillConfig.model_validate(tiny.model_dump(mode="json")) == tiny  # what runs write to config.yaml
    with pytest.raises(ConfigError, match="layout"):
        load_distill_config(ROOT / "configs/distill/tiny.yaml", ["layout=every-other:2"])


def test_a_public_code_variant_only_where_the_code_differs() -> None:
    assert DistillStageConfig(name="stage3", max_steps=1, lr=1e-3, variant="public_code").variant == "public_code"
    with pytest.raises(ValueError, match="stage 'stage2' has no public_code variant"):
        DistillStageConfig(name="stage2", max_steps=1, lr=1e-3, variant="public_code")


@pytest.mark.parametrize("value", ["4", "0.25", "[1, 2]"])
def test_a_layout_that_is_not_a_rule_string_names_the_form_a_layout_takes(value: str) -> None:
    """``layout=4`` or ``layout=0.25`` (a number where 'RULE:VALUE' belongs) said 'Input should be a valid
    dictionary or instance of HybridLayout': now the form and the rules, with the override."""
    with pytest.raises(ConfigError) as info:
        load_distill_config(ROOT / "configs/distill/tiny.yaml", [f"layout={value}"])
    message = str(info.value)
    assert message.startswith(f"command-line override 'layout={value}': layout: a layout is written 'RULE:VALUE', "
                              "RULE one of head-interleaved, tail-interleaved, head-stacked, tail-stacked, ratio, list, "
                              "linear (e.g. 'head-interleaved:4'"), message
    assert "HybridLayout" not in message and "\n" not in message


def test_an_unknown_mixer_option_is_reported_at_mixer_options_with_its_override() -> None:
    """A typo in mixer_options was reported at '<root>' (a whole-config check), blaming the config file:
    now at mixer_options, naming the override that wrote it."""
    with pytest.raises(ConfigError) as info:
        load_distill_config(ROOT / "configs/distill/tiny.yaml", ["mixer_options={d_cov: 2}"])
    assert str(info.value).startswith(
        "command-line override 'mixer_options={d_cov: 2}': mixer_options: ['d_cov'] cannot be set; choose among ["
    ), str(info.value)
    assert load_distill_config(ROOT / "configs/distill/tiny.yaml", ["mixer_options={d_conv: 2}"]).mixer_options == {
        "d_conv": 2
    }
