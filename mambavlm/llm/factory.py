"""Build the language model named by an ``LLMConfig``: random init, architecture only, or pretrained weights.

Families: ``mamba`` (Mamba-2.8B, transformers' ``MambaForCausalLM``), ``mamba2`` (this package's
Mamba-2 LM, ``SSDForCausalLM``, on transformers' ``Mamba2Config`` and checkpoint layout), ``llama``
(Vicuna-7B and the LLaMA-family teachers) and ``hybrid_llama`` (LLaMA with Mamba-2 layers, the
distilled students). Architecture-only builds work under ``with torch.device("meta"):`` so the 2.8B /
7B models can be sized without memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mambavlm.config import LLMConfig, SectionChecks, exception_line
from mambavlm.llm.hybrid import HybridLlamaConfig, HybridLlamaForCausalLM, mixer_fields_problem, mixer_width_problem
from mambavlm.llm.mamba2_lm import SSDForCausalLM
from mambavlm.llm.mamba_ssm_format import (
    is_mamba_ssm_checkpoint,
    load_mamba_ssm_checkpoint,
    mamba_ssm_config_to_hf,
    read_mamba_ssm_config,
)
from mambavlm.llm.tokenizer import tokenizer_name_problem
from mambavlm.ops import dispatch

__all__ = [
    "LLM_FAMILIES",
    "LLM_SECTION_CHECKS",
    "TORCH_DTYPES",
    "LLMBuildError",
    "build_llm",
    "check_mamba_training_kernels",
    "check_tokenizer_fits",
    "enable_activation_checkpointing",
    "family_classes",
    "llm_config_problem",
    "llm_hidden_size",
]

LLM_FAMILIES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "mamba": (MambaConfig, MambaForCausalLM),
    "mamba2": (Mamba2Config, SSDForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "hybrid_llama": (HybridLlamaConfig, HybridLlamaForCausalLM),
}


def family_classes(family: str) -> tuple[type[PreTrainedConfig], type[PreTrainedModel]]:
    """(config class, model class) of an ``llm.family``; KeyError names the known ones."""
    if family not in LLM_FAMILIES:
        raise KeyError(f"unknown llm.family {family!r}; known: {sorted(LLM_FAMILIES)}")
    return LLM_FAMILIES[family]


def llm_config_problem(llm: LLMConfig) -> str | None:
    """Why an LLM section is refused, as one line, or None: the check behind ``LLM_SECTION_CHECKS``.

    Always: an unknown ``builtin:`` tokenizer (``tokenizer_name_problem``), and for ``hybrid_llama``
    ``mamba2_mixer`` keys that are not ``Mamba2MixerConfig`` fields (``config.mamba2_mixer.d_stat:
    unknown key (did you mean 'd_state'?)``). For a random-init LLM (no ``source``; with one,
    ``llm.config`` overrides a stored config that is not read here) also a hybrid's mixer width other
    than its ``hidden_size``, and whatever the config class of ``llm.family`` refuses in ``llm.config``
    (transformers' own message: ``Inconsistent configuration: hidden_size * expand ...``)."""
    problem = tokenizer_name_problem(llm.tokenizer, key="tokenizer")
    if problem is None and llm.family == "hybrid_llama":
        problem = mixer_fields_problem(llm.config.get("mamba2_mixer"), prefix="config.")
    if problem is not None or llm.source is not None:
        return problem
    if llm.family == "hybrid_llama":
        hidden_size = llm.config.get("hidden_size", HybridLlamaConfig().hidden_size)
        problem = mixer_width_problem(llm.config.get("mamba2_mixer"), hidden_size, prefix="config.")
        if problem is not None:
            return problem
    try:
        family_classes(llm.family)[0](**llm.config)
    except Exception as err:  # noqa: BLE001 - whatever the config class raises is a problem of llm.config
        return exception_line(err)
    return None


LLM_SECTION_CHECKS: SectionChecks = {LLMConfig: llm_config_problem}
"""``mambavlm.config.validate``'s ``section_checks`` for configs that hold an LLM section."""


def enable_activation_checkpointing(llm: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant ``torch.utils.checkpoint``).

    transformers 5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns); 5.17 has only the old one: the new name where it exists."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_mamba_training_kernels(llm: torch.nn.Module, device: torch.device) -> None:
    """Fail before training when a Mamba-1 LLM on CUDA would hit mamba_ssm without causal_conv1d.

    transformers trains ``MambaForCausalLM`` through mamba_ssm's fused ``mamba_inner_fn`` whenever
    mamba_ssm imports, and that op calls the causal_conv1d kernel, asserting deep inside the first
    step when it is missing. Install both (``pip install -e ".[cuda]"``) or neither.
    """
    if device.type != "cuda" or not isinstance(llm, MambaForCausalLM):
        return
    available = dispatch.kernels_available()
    if available["mamba_ssm"] and not available["causal_conv1d"]:
        raise RuntimeError(
            "training a Mamba LLM on CUDA with mamba_ssm installed needs causal_conv1d too "
            "(transformers' fused Mamba training op calls it): pip install causal-conv1d, "
            "or uninstall mamba-ssm to train with the project's Triton selective scan"
        )


TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class LLMBuildError(ValueError):
    """The LLM config and its source do not fit together (wrong family, unknown field, no architecture),
    or the LLM and its tokenizer do not (``check_tokenizer_fits``)."""


def check_tokenizer_fits(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> None:
    """Raise ``LLMBuildError`` when ``tokenizer`` has more tokens than ``llm``'s input embedding has rows:
    its highest ids would index past the embedding (an ``IndexError`` at the first such token). The message
    names ``llm.config.vocab_size``, the model's size and the tokenizer's length (``name``: its
    ``llm.tokenizer``). A larger vocabulary than the tokenizer's is fine (checkpoints pad it)."""
    embeddings = llm.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    model_size = int(rows if rows is not None else llm.config.vocab_size)
    if len(tokenizer) > model_size:
        which = f" ({name})" if name else ""
        raise LLMBuildError(
            f"llm.config.vocab_size: the model has {model_size} token embeddings but its tokenizer{which} has "
            f"{len(tokenizer)} tokens: set llm.config.vocab_size to at least {len(tokenizer)}"
        )


def build_llm(cfg: LLMConfig, load_weights: bool = True) -> PreTrainedModel:
    """The causal LM of ``cfg``.

    - ``source`` None: random init from ``cfg.config``.
    - ``load_weights`` False: architecture only (random init, or meta tensors under a meta device
      context), its config read from ``source``'s ``config.json`` when ``source`` is a local directory,
      else from ``cfg.config``.
    - otherwise: pretrained weights; a mamba_ssm-format directory is converted, anything else goes
      through ``from_pretrained``. ``cfg.config`` entries override the stored config.

    Raises:
        LLMBuildError: a ``cfg.config`` key the family's config class lacks (a hybrid's unknown
            ``mamba2_mixer`` key too), a source of another family, missing weights, or an
            architecture-only build with neither a local source nor ``cfg.config``.
        FileNotFoundError: a local-path ``source`` that is not a directory.
    """
    config_cls, model_cls = family_classes(cfg.family)
    dtype = TORCH_DTYPES[cfg.dtype]
    check_config_fields(config_cls, cfg.config)
    if cfg.family == "hybrid_llama" and (
        problem := mixer_fields_problem(cfg.config.get("mamba2_mixer"), prefix="llm.config.")
    ):
        raise LLMBuildError(problem)
    if cfg.source is None:
        return model_cls._from_config(config_cls(**cfg.config), dtype=dtype)

    source = cfg.source
    is_local_dir = Path(source).expanduser().is_dir()
    if not is_local_dir and source.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"llm.source {source!r} is not a directory")
    if is_local_dir:
        source = str(Path(source).expanduser())

    if is_local_dir and is_mamba_ssm_checkpoint(source):
        config = mamba_ssm_config_to_hf(read_mamba_ssm_config(source), cfg.config)
        check_family(cfg.family, config.model_type, f"{source} (mamba_ssm format)")
        if load_weights:
            return load_mamba_ssm_checkpoint(source, dtype, cfg.config)
        return model_cls._from_config(config, dtype=dtype)

    if load_weights:
        config = read_hf_config(config_cls, source, cfg.family, cfg.config)
        model, info = model_cls.from_pretrained(source, config=config, dtype=dtype, output_loading_info=True)
        if info["missing_keys"]:
            raise LLMBuildError(f"llm.source {source!r} lacks weights for {sorted(info['missing_keys'])}")
        return model

    if is_local_dir:
        config = read_hf_config(config_cls, source, cfg.family, cfg.config)
    elif cfg.config:
        config = config_cls(**cfg.config)
    else:
        raise LLMBuildError(
            f"llm.source {source!r} is not a local directory and llm.config is empty: an architecture-only "
            "build needs the architecture in llm.config (nothing is downloaded)"
        )
    return model_cls._from_config(config, dtype=dtype)


def llm_hidden_size(model: PreTrainedModel) -> int:
    """Width D of the LLM's token embeddings (B, L, D), the projector's output width."""
    return int(model.config.hidden_size)


def check_config_fields(config_cls: type[PreTrainedConfig], fields: dict[str, Any]) -> None:
    """Raise ``LLMBuildError`` for keys of ``fields`` that a default ``config_cls()`` lacks.

    transformers keeps a misspelt keyword as a plain attribute, and drops some legacy ones (``rope_theta``
    when ``rope_parameters`` is stored): both would be silent no-ops, so both are errors here.
    """
    reference = config_cls()
    unknown = sorted(key for key in fields if not hasattr(reference, key))
    if unknown:
        raise LLMBuildError(f"llm.config: {config_cls.__name__} has no field(s) {unknown}")


def check_family(family: str, model_type: str | None, source: str) -> None:
    """Raise ``LLMBuildError`` if a checkpoint's ``model_type`` is not the one ``family`` builds."""
    expected = family_classes(family)[0].model_type
    if model_type != expected:
        raise LLMBuildError(
            f"llm.source {source} holds a {model_type!r} model but llm.family is {family!r} "
            f"(which loads model_type {expected!r})"
        )


def read_hf_config(
    config_cls: type[PreTrainedConfig], source: str, family: str, overrides: dict[str, Any]
) -> PreTrainedConfig:
    """The transformers config stored at ``source``, family-checked, with ``overrides`` applied."""
    config_dict, _ = config_cls.get_config_dict(source)
    check_family(family, config_dict.get("model_type"), repr(source))
    return config_cls.from_dict({**config_dict, **overrides})
