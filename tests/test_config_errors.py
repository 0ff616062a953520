"""Config errors a user reported: an override without the train config's ``model.`` prefix (or with it, in a
model config) was blamed on the YAML file with no hint, and an LLM config transformers refuses was a
traceback. Each is now one ``error:`` line naming the override or section, with the path meant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mambavlm.config import ConfigError, ModelConfig, load_config
from mambavlm.describe import main as describe_main
from mambavlm.distill.config import load_distill_config
from mambavlm.llm.factory import LLM_SECTION_CHECKS
from mambavlm.training import load_train_config
from tests.conftest import ROOT, TINY_TRAIN

TINY_MODEL_YAML = "configs/model/tiny.yaml"
TINY_TRAIN_YAML = "configs/train/tiny.yaml"
MAMBA2_REFUSED = ("Inconsistent configuration: hidden_size * expand (128) must equal num_heads * head_dim (8192).")


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _finetune_error(capsys, monkeypatch, *overrides: str) -> str:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        _script_main("finetune")(["--config", TINY_TRAIN_YAML, *overrides])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _describe_error(capsys, monkeypatch, *overrides: str) -> str:
    monkeypatch.chdir(ROOT)
    assert describe_main([TINY_MODEL_YAML, *overrides]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    return out.err


def test_a_train_override_without_the_model_prefix_names_the_override_and_the_path(capsys, monkeypatch) -> None:
    """``finetune.py --config configs/train/tiny.yaml projector.type=mlp`` said
    ``configs/train/tiny.yaml: projector: unknown key``: the file blamed, no hint."""
    err = _finetune_error(capsys, monkeypatch, "projector.type=mlp")
    assert err == ("error: command-line override 'projector.type=mlp': projector: unknown key "
                   "(did you mean 'model.projector.type'?)\n")


def test_a_model_override_with_the_model_prefix_hints_the_path_without_it(capsys, monkeypatch) -> None:
    err = _describe_error(capsys, monkeypatch, "model.projector.type=mlp")
    assert err == ("error: command-line override 'model.projector.type=mlp': model: unknown key "
                   "(did you mean 'projector.type'?)\n")
    with pytest.raises(ConfigError, match=r"^command-line override 'model.llm.config.hidden_size=32': model: "
                                          r"unknown key \(did you mean 'llm.config.hidden_size'\?\)$"):
        load_config(ModelConfig, ROOT / TINY_MODEL_YAML, ["model.llm.config.hidden_size=32"])


def test_the_path_hint_covers_sections_list_items_files_and_other_config_kinds(tmp_path: Path) -> None:
    """The same path under another section, whether an override or the file wrote it, in any schema; a
    key that is only misspelt keeps the closest spelling, and one like no other gets no guess."""
    cases = {
        "epochs=3": "command-line override 'epochs=3': epochs: unknown key (did you mean 'train.epochs'?)",
        "max_length=64": "command-line override 'max_length=64': max_length: unknown key "
                         "(did you mean 'data.max_length' or 'model.max_length'?)",
        "vision.encoders.0.image_size=64": "command-line override 'vision.encoders.0.image_size=64': vision: "
                                           "unknown key (did you mean 'model.vision.encoders.0.image_size'?)",
        "train.epoch=3": "command-line override 'train.epoch=3': train.epoch: unknown key (did you mean 'epochs'?)",
        "zzzz.type=1": "command-line override 'zzzz.type=1': zzzz: unknown key",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_train_config(TINY_TRAIN, [override])
        assert str(err.value) == message

    path = tmp_path / "train.yaml"
    path.write_text(f"model: {ROOT / TINY_MODEL_YAML}\nprojector: {{type: mlp}}\n"
                    "data: {synthetic: {num_train: 8, num_val: 2}}\noutput_dir: out\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert str(err.value) == f"{path}: projector: unknown key (did you mean 'model.projector'?)"

    with pytest.raises(ConfigError) as err:
        load_distill_config(ROOT / "configs" / "distill" / "tiny.yaml", ["stage.0.lr=3"])
    assert str(err.value) == "command-line override 'stage.0.lr=3': stage: unknown key (did you mean 'stages'?)"


def test_an_llm_config_transformers_refuses_is_one_error_line_naming_the_section(capsys, monkeypatch) -> None:
    """``python -m mambavlm.describe configs/model/tiny.yaml llm.family=mamba2`` printed transformers'
    ~30-line traceback: now the section, the file and the override that changed it, and transformers'
    message, as every other config problem is reported; train/finetune.py the same."""
    err = _describe_error(capsys, monkeypatch, "llm.family=mamba2")
    assert err == f"error: {TINY_MODEL_YAML} (with llm.family=mamba2): llm: {MAMBA2_REFUSED}\n"

    err = _finetune_error(capsys, monkeypatch, "model.llm.config.head_dim=32")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {TINY_TRAIN_YAML} (with model.llm.config.head_dim=32): model.llm: "
                          "Inconsistent configuration: hidden_size * expand (256) must equal num_heads * head_dim (512)")

    with pytest.raises(ConfigError) as error:  # the whole section from the command line: the override alone
        load_config(ModelConfig, ROOT / TINY_MODEL_YAML, ["llm={family: mamba2, config: {hidden_size: 64}}"],
                    section_checks=LLM_SECTION_CHECKS)
    assert str(error.value).startswith(
        "command-line override 'llm={family: mamba2, config: {hidden_size: 64}}': llm: Inconsistent configuration")
    # the check is the loader's to ask for: the bare schema accepts what transformers refuses
    assert load_config(ModelConfig, ROOT / TINY_MODEL_YAML, ["llm.family=mamba2"]).llm.family == "mamba2"


@pytest.mark.parametrize("script", ["finetune", "distill"])
def test_a_config_file_that_is_not_yaml_is_one_error_line_with_its_line_and_column(
    script: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    """``distill.py --config bad.yaml`` with ``layout: [a`` printed PyYAML's traceback; so did a file that
    is not UTF-8 text. Both are one line naming the file (and where the YAML breaks), exit status 2. So is
    a YAML slip inside a ``base`` file, named as that file."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("layout: [a\nseeding: mmmamba\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfeseeding")
    child = tmp_path / "child.yaml"
    child.write_text("base: bad.yaml\n")
    monkeypatch.chdir(ROOT)
    for config, message in [
        (bad, f"error: {bad}: not valid YAML: expected ',' or ']', but got ':' (line 2, column 8)\n"),
        (binary, f"error: {binary}: not a UTF-8 text file (byte 0: invalid start byte)\n"),
        (child, f"error: {bad}: not valid YAML: expected ',' or ']', but got ':' (line 2, column 8)\n"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            _script_main(script)(["--config", str(config)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == message
    with pytest.raises(ConfigError, match=r"^override 'seed=\[1': value is not valid YAML \(expected ',' or "
                                          r"'\]', but got '<stream end>' \(line 1, column 3\)\)$"):
        load_config(ModelConfig, TINY_MODEL_YAML, ["seed=[1"])
