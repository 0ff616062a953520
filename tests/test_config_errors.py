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


# --- a new-user walkthrough: bad model values that built, then failed deep inside chat / forward ---

HYBRID_LLM = {
    "family": "hybrid_llama", "tokenizer": "builtin:tiny", "template": "plain",
    "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 1024, "mamba_layers": [1],
               "mamba2_mixer": {"hidden_size": 64, "num_heads": 4, "head_dim": 16, "d_state": 8}},
}


def _hybrid_yaml(tmp_path: Path) -> Path:
    import yaml

    data = yaml.safe_load((ROOT / TINY_MODEL_YAML).read_text())
    data["llm"] = HYBRID_LLM
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_model_vocabulary_smaller_than_its_tokenizer_is_refused_when_the_tokenizer_is_loaded() -> None:
    """``llm.config.vocab_size=100`` with the 673-token tiny tokenizer built, then chat hit ``IndexError``."""
    from mambavlm.llm.factory import LLMBuildError
    from mambavlm.model import build_model

    with pytest.raises(LLMBuildError) as error:
        build_model(ROOT / TINY_MODEL_YAML, ["llm.config.vocab_size=100"], load_weights=False)
    message = str(error.value)
    assert message.startswith("llm.config.vocab_size:") and "100" in message and "673" in message
    # a larger vocabulary than the tokenizer is fine (real checkpoints pad it); no tokenizer, no check
    assert len(build_model(ROOT / TINY_MODEL_YAML, ["llm.config.vocab_size=700"], load_weights=False).tokenizer) == 673
    build_model(ROOT / TINY_MODEL_YAML, ["llm.config.vocab_size=100"], load_weights=False, load_tokenizer=False)


def test_an_encoder_image_smaller_than_one_patch_is_refused_naming_image_size_and_patch(capsys, monkeypatch) -> None:
    """``vision.encoders.0.image_size=4`` with 8 px patches described 32 visual tokens, then forward failed in
    torch. A size that is not a multiple of the patch still builds (the remainder is dropped, SigLIP 384/14)."""
    err = _describe_error(capsys, monkeypatch, "vision.encoders.0.image_size=4")
    assert err == ("error: vision.encoders.0.image_size: 4 px is smaller than one 8 x 8 px patch of "
                   "timm:vit_small_patch14_reg4_dinov2: set it to at least 8\n")
    assert describe_main([TINY_MODEL_YAML, "vision.encoders.0.image_size=36"]) == 0


def test_a_hybrid_mixer_narrower_than_the_llm_is_refused_naming_both_keys(tmp_path: Path, capsys, monkeypatch) -> None:
    """``llm.config.mamba2_mixer.hidden_size=32`` under hidden_size 64 built; the first forward failed."""
    from mambavlm.llm.hybrid import HybridLlamaConfig

    path = _hybrid_yaml(tmp_path)
    monkeypatch.chdir(ROOT)
    assert describe_main([str(path)]) == 0
    capsys.readouterr()
    assert describe_main([str(path), "llm.config.mamba2_mixer.hidden_size=32"]) == 2
    assert capsys.readouterr().err == (
        f"error: {path} (with llm.config.mamba2_mixer.hidden_size=32): llm: config.mamba2_mixer.hidden_size (32) "
        "differs from config.hidden_size (64): the Mamba-2 layers replace attention in the LLM's residual stream "
        "and must be as wide as it\n")
    with pytest.raises(Exception, match=r"mamba2_mixer.hidden_size \(32\) differs from hidden_size \(64\)"):
        HybridLlamaConfig(**{**HYBRID_LLM["config"], "mamba2_mixer": {**HYBRID_LLM["config"]["mamba2_mixer"],
                                                                       "hidden_size": 32}})


def test_a_mixer_key_typo_is_an_unknown_key_with_a_hint_not_an_old_checkpoint(tmp_path: Path, capsys,
                                                                               monkeypatch) -> None:
    """``llm.config.mamba2_mixer.d_stat=8`` said the hybrid "was saved by an older mambavlm": a config's
    strange key is a typo. A saved config.json with a renamed field keeps the convert-again message."""
    from mambavlm.config import LLMConfig
    from mambavlm.llm.factory import LLMBuildError, build_llm
    from mambavlm.llm.hybrid import HybridLlamaConfig

    path = _hybrid_yaml(tmp_path)
    monkeypatch.chdir(ROOT)
    assert describe_main([str(path), "llm.config.mamba2_mixer.d_stat=8"]) == 2
    assert capsys.readouterr().err == (f"error: {path} (with llm.config.mamba2_mixer.d_stat=8): llm: "
                                       "config.mamba2_mixer.d_stat: unknown key (did you mean 'd_state'?)\n")
    config = {**HYBRID_LLM["config"], "mamba2_mixer": {**HYBRID_LLM["config"]["mamba2_mixer"], "d_stat": 8}}
    with pytest.raises(LLMBuildError, match=r"^llm.config.mamba2_mixer.d_stat: unknown key \(did you mean 'd_state'\?\)$"):
        build_llm(LLMConfig(family="hybrid_llama", config=config), load_weights=False)
    with pytest.raises(ValueError, match="saved by an older mambavlm"):
        HybridLlamaConfig(**config).mixer_config


def test_a_missing_local_tokenizer_or_unknown_builtin_is_one_clear_error(capsys, monkeypatch) -> None:
    """``llm.tokenizer=/nonexistent/tok`` and ``llm.tokenizer=builtin:huge`` gave transformers' "Repo id must be
    in the form ..." OSError: now the key and the path, or the known builtin tokenizers."""
    from mambavlm.config import LLMConfig
    from mambavlm.llm.tokenizer import build_tokenizer

    with pytest.raises(FileNotFoundError, match=r"^llm.tokenizer '/nonexistent/tok' is not a directory"):
        build_tokenizer(LLMConfig(family="mamba", tokenizer="/nonexistent/tok"))
    with pytest.raises(FileNotFoundError, match=r"^llm.source '\./nonexistent' is not a directory"):
        build_tokenizer(LLMConfig(family="mamba", source="./nonexistent"))
    with pytest.raises(ConfigError, match=r"^llm.tokenizer 'builtin:huge' is not a builtin tokenizer; known: \['builtin:tiny'\]$"):
        build_tokenizer(LLMConfig(family="mamba", tokenizer="builtin:huge"))
    err = _describe_error(capsys, monkeypatch, "llm.tokenizer=builtin:huge")
    assert err == (f"error: {TINY_MODEL_YAML} (with llm.tokenizer=builtin:huge): llm: tokenizer 'builtin:huge' is "
                   "not a builtin tokenizer; known: ['builtin:tiny']\n")


def test_a_replace_mapping_swaps_the_base_files_instead_of_merging_into_it(tmp_path: Path) -> None:
    """A YAML that swaps the LLM family over ``base: tiny.yaml`` kept the base's Mamba fields in its
    LlamaConfig (``LlamaConfig has no field(s) ['expand', 'state_size']``), with no way to drop them:
    ``config: !replace {...}`` replaces the base's mapping; without the tag the mappings still merge."""
    from mambavlm.config import deep_merge, load_yaml, parse_yaml

    base = {"llm": {"family": "mamba", "config": {"hidden_size": 64, "expand": 2}}, "name": "tiny"}
    update = parse_yaml("llm: {family: llama, config: !replace {hidden_size: 32, num_attention_heads: 4}}")
    merged = deep_merge(base, update)
    assert merged == {"llm": {"family": "llama", "config": {"hidden_size": 32, "num_attention_heads": 4}},
                      "name": "tiny"}
    assert type(merged["llm"]["config"]) is dict  # the marker is gone once it has replaced
    assert deep_merge(base, parse_yaml("llm: {config: {hidden_size: 32}}"))["llm"]["config"] == {
        "hidden_size": 32, "expand": 2}
    swap = tmp_path / "llama.yaml"
    swap.write_text(f"base: {ROOT / TINY_MODEL_YAML}\nllm:\n  family: llama\n  config: !replace {{hidden_size: 64, "
                    "intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}\n")
    config = load_config(ModelConfig, swap)
    assert config.llm.family == "llama"
    assert config.llm.config == {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2}
    leftover = tmp_path / "leftover.yaml"  # a !replace with nothing under it in a base: a plain mapping
    leftover.write_text("extra: !replace {a: 1}\n")
    assert type(load_yaml(leftover)["extra"]) is dict
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("llm: !replace 3\n")
    with pytest.raises(ConfigError, match=r"scalar.yaml: not valid YAML: !replace takes a mapping \(line 1, column 6\)$"):
        load_yaml(scalar)


def test_encoder_kwargs_the_library_refuses_are_one_error_naming_the_key(capsys, monkeypatch) -> None:
    """``kwargs.depht=2`` and an embed_dim the heads do not divide were timm's tracebacks."""
    err = _describe_error(capsys, monkeypatch, "vision.encoders.0.kwargs.depht=2")
    assert err == ("error: vision.encoders.0.kwargs {'patch_size': 8, 'depth': 2, 'embed_dim': 48, 'num_heads': 3, "
                   "'depht': 2}: timm:vit_small_patch14_reg4_dinov2 refuses them: VisionTransformer.__init__() got "
                   "an unexpected keyword argument 'depht'\n")
    err = _describe_error(capsys, monkeypatch, "vision.encoders.1.kwargs.embed_dim=50")
    assert err.startswith("error: vision.encoders.1.kwargs {'patch_size': 8, 'depth': 2, 'embed_dim': 50, "
                          "'num_heads': 4}: timm:vit_base_patch16_siglip_224 refuses them: ")
