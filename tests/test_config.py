"""Config schemas: YAML validation, overrides, ``base`` inheritance, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mambavlm.config import (
    ConfigError,
    ModelConfig,
    apply_overrides,
    deep_merge,
    dump_yaml,
    load_config,
    load_yaml,
    parse_yaml,
)
from tests.conftest import ROOT

MODEL_CONFIGS = sorted((ROOT / "configs" / "model").glob("*.yaml"))


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


MINIMAL = {"vision": {"encoders": [{"name": "timm:vit_tiny_patch16_224"}]}, "llm": {"family": "mamba"}}


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_shipped_model_configs_validate(path: Path) -> None:
    cfg = load_config(ModelConfig, path)
    assert cfg.vision.encoders and cfg.llm.family in {"mamba", "mamba2", "llama"}


def test_paper_config_values() -> None:
    cfg = load_config(ModelConfig, ROOT / "configs/model/mambavlm-2.8b.yaml")
    assert [e.name for e in cfg.vision.encoders] == [
        "timm:vit_large_patch14_reg4_dinov2",
        "open_clip:ViT-SO400M-14-SigLIP-384",
    ]
    assert {e.image_size for e in cfg.vision.encoders} == {384}
    assert cfg.projector.type == "mamba" and cfg.projector.scan_mode == "cross-stitch"
    cat = load_config(ModelConfig, ROOT / "configs/model/mambavlm-2.8b-cross-cat.yaml")
    assert cat.projector.scan_mode == "cross-cat" and cat.llm == cfg.llm
    cobra = load_config(ModelConfig, ROOT / "configs/model/cobra-baseline.yaml")
    assert cobra.vision.fusion == "channel" and cobra.projector.type == "mlp"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    data = {**MINIMAL, "projector": {"type": "mamba", "d_stat": 16}}
    with pytest.raises(ConfigError, match=r"projector\.d_stat: unknown key"):
        load_config(ModelConfig, _write(tmp_path / "m.yaml", data))


def test_wrong_type_and_bad_choice_are_named(tmp_path: Path) -> None:
    data = {**MINIMAL, "projector": {"d_state": "many", "scan_mode": "zigzag"}}
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, _write(tmp_path / "m.yaml", data))
    msg = str(err.value)
    assert "projector.d_state" in msg and "integer" in msg
    assert "projector.scan_mode" in msg and "cross-stitch" in msg


def test_missing_required_key_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="llm: Field required"):
        load_config(ModelConfig, _write(tmp_path / "m.yaml", {"vision": MINIMAL["vision"]}))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ModelConfig, tmp_path / "absent.yaml")


def test_overrides_parse_yaml_values_and_index_lists(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.yaml", MINIMAL)
    cfg = load_config(
        ModelConfig,
        path,
        ["projector.d_state=32", "vision.encoders.0.image_size=224", "llm.config={hidden_size: 8}",
         "projector.share_directions=true", "llm.source="],
    )
    assert cfg.projector.d_state == 32 and cfg.projector.share_directions is True
    assert cfg.vision.encoders[0].image_size == 224
    assert cfg.llm.config == {"hidden_size": 8} and cfg.llm.source is None


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["projector.d_state"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, ["llm.config={a: 1, b"])
    with pytest.raises(ConfigError, match="index 3 out of range"):
        apply_overrides({"a": [1]}, ["a.3=2"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ModelConfig, None, ["vision.encoders=[{name: x}]", "llm.family=mamba", "llm.famly=x"])


def test_base_inheritance_merges_and_detects_loops(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", {**MINIMAL, "projector": {"d_state": 8, "depth": 2}})
    _write(tmp_path / "child.yaml", {"base": "base.yaml", "projector": {"d_state": 4}})
    cfg = load_config(ModelConfig, tmp_path / "child.yaml")
    assert cfg.projector.d_state == 4 and cfg.projector.depth == 2
    _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="loops back"):
        load_config(ModelConfig, tmp_path / "a.yaml")
    assert deep_merge({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": 3}, "l": [2]}) == {
        "a": {"b": 3, "c": 2},
        "l": [2],
    }


def test_yaml_booleans_are_only_true_and_false() -> None:
    """YAML 1.2 booleans: PyYAML's 1.1 rules would read accelerate's ``no`` as False."""
    assert parse_yaml("[true, False, TRUE, no, yes, on, off, 'no', y]") == [
        True, False, True, "no", "yes", "on", "off", "no", "y"
    ]
    assert parse_yaml("a: {b: no, c: 1.5e-3, d: null, e: 3}") == {"a": {"b": "no", "c": 1.5e-3, "d": None, "e": 3}}


def test_yaml_numbers_follow_the_1_2_core_schema_in_files_and_overrides(tmp_path: Path) -> None:
    """The YAML 1.2 spec's core schema (section 10.3.2), each value worked by hand: a float needs no dot
    (``1e-5``, PyYAML's 1.1 rules a string, which a free-form ``llm.config`` handed to transformers as
    text), ``010`` is ten (1.1: octal 8), ``0o`` / ``0x`` are octal / hex, ``_`` is no digit separator."""
    assert parse_yaml("[1e-5, 1.0e-5, -2E+3, .5, 3., 010, 0o17, 0x1F, +3, 1_000, 0x, 1.2.3, -.inf, .NaN]")[:13] == [
        0.00001, 0.00001, -2000.0, 0.5, 3.0, 10, 15, 31, 3, "1_000", "0x", "1.2.3", float("-inf")
    ]
    assert [type(v) for v in parse_yaml("[1, 1.0, 1e0]")] == [int, float, float]
    nan = parse_yaml(".NaN")
    assert nan != nan
    model = load_config(ModelConfig, ROOT / "configs" / "model" / "tiny.yaml", ["llm.config.layer_norm_epsilon=1e-5"])
    assert model.llm.config["layer_norm_epsilon"] == 0.00001
    (tmp_path / "m.yaml").write_text(f"base: {ROOT / 'configs' / 'model' / 'tiny.yaml'}\nmax_length: 010\n")
    assert load_config(ModelConfig, tmp_path / "m.yaml").max_length == 10


def test_a_recorded_config_reads_back_as_written_by_either_yaml_version() -> None:
    """train_config.yaml and the like are written by ``dump_yaml``: PyYAML's safe_dump leaves "1e5" plain
    (a string in YAML 1.1), which ``ConfigLoader`` reads back as a float; a run name or path like that
    would change type on resume."""
    data = {"name": "1e5", "mp": "no", "n": "010", "o": "0o7", "h": "0x1F", "d": ".5", "t": "true", "x": "x",
            "lr": 1e-5, "steps": 10, "none": None, "list": [1, "2"]}
    assert parse_yaml(yaml.safe_dump(data, sort_keys=False))["name"] == 100000.0  # the hazard
    text = dump_yaml(data)
    assert parse_yaml(text) == data and yaml.safe_load(text) == data
    assert list(parse_yaml(text)) == list(data)  # keys in their order


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys silently; a config's second ``lr`` is a mistake to name."""
    (tmp_path / "t.yaml").write_text("train:\n  lr: 1.0e-3\n  epochs: 1\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: .*'lr' twice \(first on line 2\).*line 4"):
        load_yaml(tmp_path / "t.yaml")
    with pytest.raises(yaml.YAMLError, match="'b' twice"):
        parse_yaml("a: {b: 1, b: 2}")
    assert parse_yaml("a: {b: 1}\nc: {b: 2}") == {"a": {"b": 1}, "c": {"b": 2}}  # the same key in two mappings


def test_mixed_precision_no_reads_as_a_string_from_file_and_command_line(tmp_path: Path) -> None:
    from mambavlm.distill.config import load_distill_config
    from mambavlm.training import load_train_config

    train = load_train_config(ROOT / "configs" / "train" / "tiny.yaml", ["train.mixed_precision=no"])
    assert train.train.mixed_precision == "no"
    distill_yaml = tmp_path / "d.yaml"
    distill_yaml.write_text(f"base: {ROOT / 'configs' / 'distill' / 'tiny.yaml'}\nmixed_precision: no\n")
    assert load_distill_config(distill_yaml, []).mixed_precision == "no"
    assert load_distill_config(ROOT / "configs" / "distill" / "tiny.yaml", ["mixed_precision=bf16"]).mixed_precision == "bf16"


def test_errors_show_the_wrong_value_hint_null_and_spot_a_train_config(tmp_path: Path) -> None:
    tiny = ROOT / "configs" / "model" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"projector\.d_state: .* \(got '=3'\)"):
        load_config(ModelConfig, tiny, ["projector.d_state==3"])
    with pytest.raises(ConfigError, match=r"\(got 'None'; YAML's null is written null\)"):
        load_config(ModelConfig, tiny, ["projector.d_state=None"])
    with pytest.raises(ConfigError, match="this looks like a train config"):
        load_config(ModelConfig, ROOT / "configs" / "train" / "tiny.yaml")
    with pytest.raises(TypeError, match=r"pass \['projector.type=mlp'\]"):
        load_config(ModelConfig, tiny, "projector.type=mlp")


def test_a_section_base_that_does_not_exist_names_the_file_and_key(tmp_path: Path) -> None:
    """A train config copied out of configs/train/ keeps its relative ``model: {base: ...}``: the error
    names the copied file and the key that points nowhere, not only the missing path (a fresh user's
    trial); a string model reference the same."""
    from mambavlm.training import load_train_config

    copied = tmp_path / "mine.yaml"
    copied.write_text((ROOT / "configs" / "train" / "tiny.yaml").read_text())
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(copied))}: model.base: config file not found: "
                                          rf"{re.escape(str(tmp_path.parent / 'model' / 'tiny.yaml'))}$"):
        load_train_config(copied)
    copied.write_text("model: nowhere/model.yaml\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: model: config file not found: .*nowhere/model.yaml"):
        load_train_config(copied)


def test_an_encoder_name_typo_is_a_config_error_naming_the_key_and_the_closest_names() -> None:
    """The encoder names are checked against timm's and open_clip's registries when the config is
    validated (before anything is built): a misspelt model or library names the override, the key and
    the closest names, with no pydantic prefix."""
    tiny = ROOT / "configs" / "model" / "tiny.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, tiny, ["vision.encoders.0.name=timm:vit_small_patch14_reg4_dinov3"])
    assert str(err.value).startswith(
        "command-line override 'vision.encoders.0.name=timm:vit_small_patch14_reg4_dinov3': vision.encoders.0.name: "
        "unknown timm "
        "model 'vit_small_patch14_reg4_dinov3'; close matches: vit_small_patch14_reg4_dinov2")
    with pytest.raises(ConfigError, match=r"vision.encoders.1.name: unknown library 'openclip' in encoder name "
                                          r"'openclip:ViT-B-16' \(did you mean 'open_clip'\?\)"):
        load_config(ModelConfig, tiny, ["vision.encoders.1.name=openclip:ViT-B-16"])
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-B-17'; close matches: .*ViT-B-16"):
        load_config(ModelConfig, tiny, ["vision.encoders.1.name=open_clip:ViT-B-17"])
    assert load_config(ModelConfig, tiny, ["vision.encoders.1.name=open_clip:ViT-B-16"]).vision.encoders[1].name \
        == "open_clip:ViT-B-16"
