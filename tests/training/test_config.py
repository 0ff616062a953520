"""The training config: the model path resolved, overrides applied, unknown keys and bad batch sizes
named, a missing data file a clear error."""

from __future__ import annotations

import pytest

from mambavlm.config import ConfigError
from mambavlm.training import load_train_config, run_finetune
from tests.conftest import TINY_MODEL, TINY_TRAIN

pytestmark = pytest.mark.usefixtures("on_cpu")


def test_config_resolves_model_path_and_applies_model_overrides(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.yaml").write_text(TINY_MODEL.read_text())
    (tmp_path / "runs").mkdir()
    path = tmp_path / "runs" / "t.yaml"
    path.write_text("model: ../models/m.yaml\ndata: {synthetic: {num_train: 8, num_val: 2}}\noutput_dir: out\n")
    config = load_train_config(path, ["model.projector.d_state=5", "train.max_steps=3"])
    assert config.model.projector.d_state == 5
    assert config.model.llm.tokenizer == "builtin:tiny"
    assert config.train.max_steps == 3
    assert config.output_dir == "out"


def test_config_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_train_config(TINY_TRAIN, ["train.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"model\.projector\.d_stat: unknown key"):
        load_train_config(TINY_TRAIN, ["model.projector.d_stat=4"])


def test_a_typo_names_the_override_that_made_it_and_the_closest_key(tmp_path):
    """A fresh user's train.max_step=5 was reported against the YAML file, without a hint: the override
    is named and the schema's closest key there suggested (in sections, list items and nested models);
    a typo in the file is still the file's, and a key like no other gets no guess."""
    with pytest.raises(ConfigError) as error:
        load_train_config(TINY_TRAIN, ["train.lr=3e-4", "train.max_step=5", "lora={r: 4, alph: 3}"])
    assert sorted(str(error.value).splitlines()) == [
        "command-line override 'lora={r: 4, alph: 3}': lora.alph: unknown key (did you mean 'alpha'?)",
        "command-line override 'train.max_step=5': train.max_step: unknown key (did you mean 'max_steps'?)",
    ]
    with pytest.raises(ConfigError, match=r"^command-line override 'model.vision.encoders.0.image_sise=64': "
                       r"model.vision.encoders.0.image_sise: unknown key \(did you mean 'image_size'\?\)$"):
        load_train_config(TINY_TRAIN, ["model.vision.encoders.0.image_sise=64"])
    path = tmp_path / "train.yaml"
    base = (TINY_TRAIN.parent / "../model/tiny.yaml").resolve()
    path.write_text(TINY_TRAIN.read_text().replace("  epochs:", "  epoch:").replace("../model/tiny.yaml", str(base)))
    with pytest.raises(ConfigError, match=rf"^{path}: train.epoch: unknown key \(did you mean 'epochs'\?\)$"):
        load_train_config(path)
    with pytest.raises(ConfigError, match=r"^command-line override 'train.zzzz=1': train.zzzz: unknown key$"):
        load_train_config(TINY_TRAIN, ["train.zzzz=1"])


def test_config_rejects_batch_sizes_that_do_not_divide():
    with pytest.raises(ConfigError, match="global_batch_size=10 is not a multiple of train.micro_batch_size=4"):
        load_train_config(TINY_TRAIN, ["train.global_batch_size=10", "train.micro_batch_size=4"])


def test_missing_data_file_is_a_clear_error(tmp_path):
    config = load_train_config(TINY_TRAIN, [f"output_dir={tmp_path}", f"data.train={tmp_path / 'nope.json'}"])
    with pytest.raises(FileNotFoundError, match=r"data\.train: file not found: .*nope\.json"):
        run_finetune(config)


def test_an_image_root_for_the_synthetic_task_is_refused_not_ignored(tmp_path):
    """data.image_root without data.train had been dropped silently (the synthetic task reads its own
    images), as data.val is refused; with data.train it is taken."""
    with pytest.raises(ConfigError, match="data.image_root is set but data.train is not"):
        load_train_config(TINY_TRAIN, ["output_dir=x", f"data.image_root={tmp_path}"])
    config = load_train_config(TINY_TRAIN, ["output_dir=x", f"data.image_root={tmp_path}", "data.train=t.json"])
    assert config.data.image_root == str(tmp_path)


def test_data_max_length_beyond_the_models_is_an_error_when_the_config_loads():
    with pytest.raises(ConfigError, match="data.max_length=300 exceeds model.max_length=256"):
        load_train_config(TINY_TRAIN, ["output_dir=x", "data.max_length=300"])
    assert load_train_config(TINY_TRAIN, ["output_dir=x", "data.max_length=256"]).data.max_length == 256


def test_a_config_elsewhere_inheriting_a_train_config_keeps_its_model_base(tmp_path):
    """configs/train/tiny.yaml writes ``model: {base: ../model/tiny.yaml}``: relative to itself, also
    when a file in another directory inherits it (it was resolved against the inheriting file's
    directory: "config file not found: <tmp>/../model/tiny.yaml")."""
    mine = tmp_path / "cfg" / "mytrain.yaml"
    mine.parent.mkdir()
    mine.write_text(f"base: {TINY_TRAIN}\ntrain: {{max_steps: 3}}\n")
    config = load_train_config(mine, [f"output_dir={tmp_path / 'out'}"])
    assert config.train.max_steps == 3
    assert config.model == load_train_config(TINY_TRAIN, [f"output_dir={tmp_path / 'out'}"]).model
    # a string model path in an inherited file, relative to that file too
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.yaml").write_text(TINY_MODEL.read_text())
    (tmp_path / "a" / "parent.yaml").write_text(f"base: {TINY_TRAIN}\nmodel: m.yaml\n")
    (tmp_path / "child.yaml").write_text("base: a/parent.yaml\n")
    assert load_train_config(tmp_path / "child.yaml", []).model.name == "tiny"
    (tmp_path / "broken.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml \(the base of .*broken.yaml\)"):
        load_train_config(tmp_path / "broken.yaml", [])


@pytest.mark.parametrize("script", ["finetune", "distill"])
def test_the_scripts_report_a_config_error_without_a_traceback(script, capsys):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(f"{script}_script", ROOT / "train" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = ROOT / "configs" / ("train" if script == "finetune" else "distill") / "tiny.yaml"
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--config", str(config), "lrr_typo=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lrr_typo: unknown key" in err and "Traceback" not in err


@pytest.mark.parametrize("script", ["finetune", "distill"])
def test_the_scripts_report_an_error_found_when_the_run_starts_without_a_traceback(script, capsys, monkeypatch, tmp_path):
    """A ConfigError raised once the run starts (here: a tracker whose package is missing) is the
    user's to fix too: 'error: ...', exit 2."""
    import importlib.util

    import accelerate.utils

    from tests.conftest import ROOT

    monkeypatch.setattr(accelerate.utils, "is_comet_ml_available", lambda: False)
    spec = importlib.util.spec_from_file_location(f"{script}_script", ROOT / "train" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = ROOT / "configs" / ("train" if script == "finetune" else "distill") / "tiny.yaml"
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--config", str(config), "trackers=[comet_ml]", f"output_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: trackers: comet_ml not installed; pip install comet-ml") and "Traceback" not in err


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("finetune", "model.llm.config.hiden_size=64", "error: llm.config: .* has no field\\(s\\) \\['hiden_size'\\]"),
        ("finetune", "data.train=nope.json", "error: data.train: file not found: nope.json"),
        ("distill", "teacher=nope", "error: teacher nope does not exist$"),
    ],
    ids=["llm-config-typo", "missing-data", "missing-teacher"],
)
def test_a_bad_model_or_path_is_an_error_line_before_any_data_is_made(script, override, message, capsys, tmp_path):
    """A fresh user's trial: a typo in the LLM's config, a missing data file or teacher surfaced as
    tracebacks, the first and the last only after the synthetic data set was written. Now 'error: ...',
    exit 2, and nothing generated."""
    import importlib.util
    import re

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(f"{script}_script", ROOT / "train" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = ROOT / "configs" / ("train" if script == "finetune" else "distill") / "tiny.yaml"
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--config", str(config), override, f"output_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.match(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "run" / "data").exists()


@pytest.mark.parametrize(("script", "runner", "resume_key"), [
    ("finetune", "mambavlm.training.run_finetune", "train.resume_from"),
    ("distill", "mambavlm.distill.run.run_distillation", "resume_from"),
])
def test_ctrl_c_ends_the_scripts_with_one_line_and_exit_130(script, runner, resume_key, capsys, monkeypatch, tmp_path):
    """Ctrl-C (KeyboardInterrupt) stops a run without a checkpoint, as documented; the script says so in
    one line naming how to go on and exits 130 (128 + SIGINT), where it printed a traceback."""
    import importlib.util

    from tests.conftest import ROOT

    def interrupted(config: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, interrupted)
    spec = importlib.util.spec_from_file_location(f"{script}_script", ROOT / "train" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = ROOT / "configs" / ("train" if script == "finetune" else "distill") / "tiny.yaml"
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--config", str(config), f"output_dir={tmp_path}"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err == (f"interrupted by Ctrl-C: no checkpoint written for the steps since the last one; "
                   f"{resume_key}=latest continues from the newest in {tmp_path}, if any\n")
