"""Checkpoints in mamba_ssm's own format (e.g. ``state-spaces/mamba-2.8b-slimpj``), read into transformers.

mamba_ssm saves ``config.json`` with ``d_model``, ``n_layer``, ``vocab_size``, ``ssm_cfg``, ... and the
weights of ``MambaLMHeadModel`` in ``pytorch_model.bin`` (or ``model.safetensors``) under keys
``backbone.embedding.weight``, ``backbone.layers.N.{norm,mixer.*}``, ``backbone.norm_f.weight`` and
``lm_head.weight``. transformers' ``MambaForCausalLM`` and this package's Mamba-2 LM (``SSDForCausalLM``,
transformers' ``Mamba2ForCausalLM`` layout) use the same parameter layouts and names except
``backbone.embeddings``; the Mamba-2 mixer's gated norm is ``mixer.norm`` in both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    Mamba2Config,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
)

from mambavlm.llm.mamba2_lm import SSDForCausalLM

__all__ = [
    "MambaSsmCheckpointError",
    "convert_mamba_ssm_state_dict",
    "is_mamba_ssm_checkpoint",
    "load_mamba_ssm_checkpoint",
    "mamba_ssm_config_to_hf",
    "read_mamba_ssm_config",
]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# mamba_ssm.models.config_mamba.MambaConfig defaults.
MODEL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50277,
    "d_intermediate": 0,
    "ssm_cfg": {},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
# Keys mamba_ssm passes to the mixers that only choose kernels or bookkeeping: no effect on weights or math.
RUNTIME_ONLY_SSM_KEYS = {"layer", "layer_idx", "use_fast_path", "use_mem_eff_path"}
# ssm_cfg key -> (HF field, mamba_ssm default) for mamba_ssm.modules.mamba_simple.Mamba.
MAMBA1_SSM_FIELDS: dict[str, tuple[str, Any]] = {
    "d_state": ("state_size", 16),
    "d_conv": ("conv_kernel", 4),
    "expand": ("expand", 2),
    "dt_min": ("time_step_min", 0.001),
    "dt_max": ("time_step_max", 0.1),
    "dt_init": ("time_step_init_scheme", "random"),
    "dt_scale": ("time_step_scale", 1.0),
    "dt_init_floor": ("time_step_floor", 1e-4),
    "conv_bias": ("use_conv_bias", True),
    "bias": ("use_bias", False),
}
# ssm_cfg key -> (HF field, mamba_ssm default) for mamba_ssm.modules.mamba2.Mamba2.
MAMBA2_SSM_FIELDS: dict[str, tuple[str, Any]] = {
    "d_state": ("state_size", 128),
    "d_conv": ("conv_kernel", 4),
    "expand": ("expand", 2),
    "headdim": ("head_dim", 64),
    "ngroups": ("n_groups", 1),
    "chunk_size": ("chunk_size", 256),
    "dt_min": ("time_step_min", 0.001),
    "dt_max": ("time_step_max", 0.1),
    "dt_init_floor": ("time_step_floor", 1e-4),
    "dt_limit": ("time_step_limit", (0.0, float("inf"))),
    "conv_bias": ("use_conv_bias", True),
    "bias": ("use_bias", False),
}
# Mamba-2 options that only change initialisation (no HF field, no effect on loaded weights).
MAMBA2_INIT_ONLY_KEYS = {"A_init_range", "conv_init"}
# Mamba-2 options a Mamba2Config cannot express: checkpoints must use these values.
MAMBA2_FIXED_OPTIONS: dict[str, Any] = {"rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False}


class MambaSsmCheckpointError(ValueError):
    """A mamba_ssm checkpoint cannot be represented by or loaded into the transformers model."""


def is_mamba_ssm_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a directory whose ``config.json`` is mamba_ssm's (``d_model`` and ``n_layer``)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    with config_file.open() as f:
        data = json.load(f)
    return isinstance(data, dict) and "d_model" in data and "n_layer" in data


def read_mamba_ssm_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a mamba_ssm checkpoint directory, as a dict."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in mamba_ssm checkpoint directory {path}")
    with config_file.open() as f:
        return json.load(f)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Vocabulary size rounded up to a multiple, as ``MambaLMHeadModel`` pads its embedding."""
    if vocab_size % multiple != 0:
        vocab_size += multiple - vocab_size % multiple
    return vocab_size


def mamba_ssm_config_to_hf(
    cfg: dict[str, Any], overrides: dict[str, Any] | None = None
) -> MambaConfig | Mamba2Config:
    """Translate a mamba_ssm ``config.json`` dict into a transformers config.

    ``ssm_cfg["layer"] == "Mamba2"`` gives a ``Mamba2Config``, anything else a ``MambaConfig``.
    ``overrides`` are HF config fields applied on top. Options transformers cannot represent
    (MLP or attention layers, LayerNorm instead of RMSNorm, ...) raise ``MambaSsmCheckpointError``.
    """
    for key in ("d_model", "n_layer"):
        if key not in cfg:
            raise MambaSsmCheckpointError(f"mamba_ssm config is missing {key!r}")
    unknown = set(cfg) - set(MODEL_DEFAULTS) - {"d_model", "n_layer"}
    if unknown:
        raise MambaSsmCheckpointError(f"mamba_ssm config has unknown keys {sorted(unknown)}")
    cfg = {**MODEL_DEFAULTS, **cfg}
    if cfg["d_intermediate"]:
        raise MambaSsmCheckpointError(
            f"mamba_ssm config has MLP layers (d_intermediate={cfg['d_intermediate']}); "
            "transformers' Mamba models have none"
        )
    if cfg["attn_layer_idx"]:
        raise MambaSsmCheckpointError(
            f"mamba_ssm config has attention layers {cfg['attn_layer_idx']}; "
            "transformers' Mamba models have none"
        )
    if not cfg["rms_norm"]:
        raise MambaSsmCheckpointError(
            "mamba_ssm config uses LayerNorm (rms_norm=false); transformers' Mamba models use RMSNorm"
        )
    d_model = int(cfg["d_model"])
    common: dict[str, Any] = {
        "hidden_size": d_model,
        "num_hidden_layers": int(cfg["n_layer"]),
        "vocab_size": padded_vocab_size(int(cfg["vocab_size"]), int(cfg["pad_vocab_size_multiple"])),
        "residual_in_fp32": bool(cfg["residual_in_fp32"]),
        "tie_word_embeddings": bool(cfg["tie_embeddings"]),
        "layer_norm_epsilon": 1e-5,
        # GPT-NeoX tokenizer of the state-spaces checkpoints: <|endoftext|> = 0.
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    ssm_cfg = dict(cfg["ssm_cfg"])
    if ssm_cfg.get("layer", "Mamba1") == "Mamba2":
        fields = _translate_ssm_cfg(
            ssm_cfg, MAMBA2_SSM_FIELDS, MAMBA2_INIT_ONLY_KEYS | set(MAMBA2_FIXED_OPTIONS)
        )
        for key, supported in MAMBA2_FIXED_OPTIONS.items():
            if key in ssm_cfg and ssm_cfg[key] != supported:
                raise MambaSsmCheckpointError(
                    f"mamba_ssm ssm_cfg.{key}={ssm_cfg[key]!r} cannot be expressed by a Mamba2Config "
                    f"(needs {supported!r})"
                )
        d_inner = fields["expand"] * d_model
        if ssm_cfg.get("d_ssm") not in (None, d_inner):
            raise MambaSsmCheckpointError(
                f"mamba_ssm ssm_cfg.d_ssm={ssm_cfg['d_ssm']} differs from expand * d_model = {d_inner}; "
                "a Mamba2Config runs the SSM on the whole inner width"
            )
        if d_inner % fields["head_dim"] != 0:
            raise MambaSsmCheckpointError(
                f"mamba_ssm inner width {d_inner} is not a multiple of ssm_cfg.headdim={fields['head_dim']}"
            )
        fields["num_heads"] = d_inner // fields["head_dim"]
        fields["time_step_limit"] = tuple(fields["time_step_limit"])
        return Mamba2Config(**{**common, **fields, **(overrides or {})})
    fields = _translate_ssm_cfg(ssm_cfg, MAMBA1_SSM_FIELDS, {"dt_rank"})
    dt_rank = ssm_cfg.get("dt_rank", "auto")
    fields["time_step_rank"] = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
    return MambaConfig(**{**common, **fields, **(overrides or {})})


def _translate_ssm_cfg(
    ssm_cfg: dict[str, Any], table: dict[str, tuple[str, Any]], handled_elsewhere: set[str]
) -> dict[str, Any]:
    """HF fields from ``ssm_cfg`` via ``table`` (mamba_ssm defaults for absent keys); unknown keys raise."""
    known = set(table) | handled_elsewhere | RUNTIME_ONLY_SSM_KEYS | {"d_ssm"}
    unknown = set(ssm_cfg) - known
    if unknown:
        layer = ssm_cfg.get("layer", "Mamba1")
        raise MambaSsmCheckpointError(f"mamba_ssm ssm_cfg has keys unknown for {layer}: {sorted(unknown)}")
    return {hf_name: ssm_cfg.get(key, default) for key, (hf_name, default) in table.items()}


def convert_mamba_ssm_state_dict(
    sd: dict[str, torch.Tensor], config: MambaConfig | Mamba2Config
) -> dict[str, torch.Tensor]:
    """Rename mamba_ssm keys to transformers': ``backbone.embedding`` -> ``backbone.embeddings``.

    With tied embeddings ``lm_head.weight`` (a copy of the embedding in mamba_ssm's files) is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key.startswith("backbone.embedding."):
            key = "backbone.embeddings." + key[len("backbone.embedding.") :]
        out[key] = tensor
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def read_mamba_ssm_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict of a mamba_ssm checkpoint directory (safetensors preferred)."""
    path = Path(path)
    safetensors_file, bin_file = (path / name for name in WEIGHT_FILES)
    if safetensors_file.is_file():
        return load_file(safetensors_file)
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
    raise FileNotFoundError(
        f"no weights in mamba_ssm checkpoint directory {path}: expected one of {WEIGHT_FILES}"
    )


def check_state_dict(
    sd: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str | Path
) -> None:
    """Raise ``MambaSsmCheckpointError`` naming every missing, unexpected or wrongly shaped parameter."""
    problems = [f"missing: {key}" for key in sorted(set(expected) - set(sd))]
    problems += [f"unexpected: {key}" for key in sorted(set(sd) - set(expected))]
    problems += [
        f"shape mismatch: {key}: checkpoint {tuple(sd[key].shape)} vs model {tuple(expected[key])}"
        for key in sorted(set(sd) & set(expected))
        if sd[key].shape != expected[key]
    ]
    if problems:
        raise MambaSsmCheckpointError(
            f"mamba_ssm checkpoint {source} does not match the model:\n  " + "\n  ".join(problems)
        )


def load_mamba_ssm_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, overrides: dict[str, Any] | None = None
) -> PreTrainedModel:
    """Load a mamba_ssm checkpoint directory as ``MambaForCausalLM`` / ``SSDForCausalLM`` (eval mode).

    The model is built on the meta device and takes the checkpoint's tensors (cast to ``dtype``) after a
    strict check of keys and shapes; ``overrides`` are HF config fields.
    """
    config = mamba_ssm_config_to_hf(read_mamba_ssm_config(path), overrides)
    model_cls = SSDForCausalLM if isinstance(config, Mamba2Config) else MambaForCausalLM
    sd = convert_mamba_ssm_state_dict(read_mamba_ssm_weights(path), config)
    with torch.device("meta"):
        model = model_cls._from_config(config, dtype=dtype)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    check_state_dict(sd, expected, path)
    sd = {key: value.to(device="cpu", dtype=dtype) for key, value in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)  # keys checked above; tied lm_head comes next
    model.tie_weights()
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise MambaSsmCheckpointError(f"mamba_ssm checkpoint {path} left tensors uninitialised: {on_meta}")
    return model.eval()
