"""configs/accelerate/*.yaml load through accelerate's own config reader (which refuses unknown keys)
and say what their names and the README promise: the strategy, ZeRO's stage, FSDP's full sharding with
the original parameters (frozen encoders and trained weights share wrapped units), the 16-bit gather of a
ZeRO-3 model at save, and DeepSpeed's clipping equal to the paper recipe's max_grad_norm."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from mambavlm.training import load_train_config
from tests.conftest import ROOT

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
