"""configs/accelerate/*.yaml load through accelerate's own config reader (which refuses unknown keys)
and say what their names and the README promise: the strategy, ZeRO's stage, FSDP's full sharding with
the original parameters (frozen encoders and trained weights share wrapped units), the 16-bit gather of a
ZeRO-3 model at save, and DeepSpeed's clipping equal to the paper recipe's max_grad_norm."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

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
    if name.startswith("deepspeed"):
        stage = int(name[-1])
        assert config.deepspeed_config["zero_stage"] == stage
        paper = load_train_config(ROOT / "configs" / "train" / "mambavlm-2.8b.yaml", ["data.train=x.json"])
        assert config.deepspeed_config["gradient_clipping"] == paper.train.max_grad_norm
        assert config.deepspeed_config.get("zero3_save_16bit_model", False) == (stage == 3)
    if name == "fsdp":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert config.fsdp_config["fsdp_use_orig_params"] is True


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
