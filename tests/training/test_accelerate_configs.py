"""configs/accelerate/*.yaml load through accelerate's own config reader (which refuses unknown keys)
and say what their names and the README promise: the strategy, FSDP's full sharding with the original
parameters (frozen encoders and trained weights share wrapped units); and the DeepSpeed settings a
training process receives from ``accelerate launch`` (ZeRO's stage, the 16-bit gather of a ZeRO-3 model
at save, clipping equal to the paper recipe's max_grad_norm, ZeRO-2's overlapped gradient reduction,
the micro-batch and accumulation left to the train config)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env

from mambavlm.distill.convert import convert_vlm
from mambavlm.model import build_model
from mambavlm.training import load_train_config
from tests.conftest import ROOT, tiny_llama_vlm, tiny_vlm

CONFIGS = ROOT / "configs" / "accelerate"


@pytest.mark.parametrize(
    ("name", "kind"),
    [("ddp", DistributedType.MULTI_GPU), ("fsdp", DistributedType.FSDP),
     ("deepspeed_zero2", DistributedType.DEEPSPEED), ("deepspeed_zero3", DistributedType.DEEPSPEED)],
)
def test_accelerate_config_loads_and_says_what_its_name_says(name: str, kind: DistributedType) -> None:
    config = ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind
    assert (config.num_machines, config.use_cpu) == (1, False)
    if name == "fsdp":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert config.fsdp_config["fsdp_use_orig_params"] is True


def launched_deepspeed_plugin(name: str, monkeypatch: pytest.MonkeyPatch) -> DeepSpeedPlugin:
    """The DeepSpeed plugin a training process builds under ``accelerate launch --config_file
    configs/accelerate/NAME.yaml``, from the repository root: the environment accelerate's DeepSpeed
    launcher prepares (``prepare_deepspeed_cmd_env``, after its own ``_validate_launch_command``; the
    list of config fields as ``launch_command`` makes it, which the plugin checks against a DeepSpeed
    config file), read by ``DeepSpeedPlugin`` in that environment."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / f"{name}.yaml"), "--num_processes", "2", "train/finetune.py"]
    )
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    return DeepSpeedPlugin()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_reaches_the_training_process(stage: int, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = launched_deepspeed_plugin(f"deepspeed_zero{stage}", monkeypatch)
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == ds["zero_optimization"]["stage"] == stage
    assert plugin.zero3_init_flag is False  # models are built whole and partitioned in accelerator.prepare
    paper = load_train_config(ROOT / "configs" / "train" / "mambavlm-2.8b.yaml", ["data.train=x.json"])
    assert ds["gradient_clipping"] == paper.train.max_grad_norm
    assert ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    # DeepSpeed leaves overlap_comm off at stage 2 and on at stage 3; without it ZeRO-2's gradient
    # reduction after each micro-batch waits for the backward's end (benchmarks/results/multi_gpu.md)
    assert ds["zero_optimization"].get("overlap_comm", stage == 3) is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    # accelerate fills these from the loader and the trainer's accumulation (global / (micro x processes))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert plugin.is_auto(key), key
    plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=16)
    assert plugin.get_value("gradient_accumulation_steps") == 16


def test_every_accelerate_config_is_tested() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]


def _train_config_model() -> torch.nn.Module:
    """The offline default's model (configs/train/tiny.yaml: a Mamba-2 LLM), untrained."""
    config = load_train_config(ROOT / "configs" / "train" / "tiny.yaml", [])
    torch.manual_seed(0)
    return build_model(config.model, load_weights=False)


@pytest.mark.parametrize(
    ("model_fn", "blocks"),
    [(tiny_vlm, {"MambaBlock"}), (_train_config_model, {"SSDBlock"}), (tiny_llama_vlm, {"LlamaDecoderLayer"}),
     (lambda: convert_vlm(tiny_llama_vlm(), "head-interleaved:2", "matvlm"), {"LlamaDecoderLayer"})],
    ids=["mamba", "mamba2", "llama", "hybrid"],
)
def test_fsdp_config_wraps_each_llms_blocks(model_fn: Callable[[], torch.nn.Module], blocks: set[str]) -> None:
    """fsdp.yaml names no layer class: accelerate wraps the classes the model lists in
    ``_no_split_modules``, and refuses to start when one is not in the model (a Mamba-2 run under a
    MambaBlock wrap did, on the GPUs). Each LLM's blocks are among them, and each listed class exists."""
    config = ClusterConfig.from_yaml_file(str(CONFIGS / "fsdp.yaml"))
    assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    model = model_fn()
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)  # raises ValueError for a listed class the model lacks
    wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert blocks <= wrapped
    assert wrapped <= {type(m).__name__ for m in model.modules()}
