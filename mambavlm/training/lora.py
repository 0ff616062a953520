"""LoRA and QLoRA fine-tuning of a MambaVLM through peft: adapters on the LLM, the projector trained
fully (or by adapter, or frozen), adapters saved on their own and merged into a full model.

``apply_lora(model, settings)`` replaces ``model.llm`` by peft's ``PeftModel`` around it (the
adapter's weights are the only LLM parameters that train) and, with ``projector: lora``, injects
adapters into the projector's linear layers. ``LoraTrainable`` is the trainer's policy for it.
``save_adapter`` writes peft's ``adapter_config.json`` + ``adapter_model.safetensors`` for the LLM,
the projector's trained weights, and the model config the base is rebuilt from; ``merge_adapter``
folds the adapters into the base weights (peft's ``merge_and_unload``), giving a plain MambaVLM that
``save_pretrained`` writes whole. QLoRA (``qlora: true``) loads the LLM's linear layers in 4-bit
NF4 with bitsandbytes, on CUDA only, as QLoRA does (Dettmers et al., 2023).

peft is an optional dependency (``pip install -e ".[lora]"``); it is imported when used.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mambavlm.atomic import atomic_directory
from mambavlm.config import ConfigError, dump_yaml
from mambavlm.model import MambaVLM
from mambavlm.training.config import LoraSettings

__all__ = [
    "ADAPTER_DIR",
    "BASE_DIR",
    "MODEL_CONFIG_FILE",
    "LoraTrainable",
    "FAMILY_TARGETS",
    "apply_lora",
    "check_targets_exist",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "target_modules",
]

logger = logging.getLogger(__name__)

ADAPTER_DIR = "llm_adapter"
"""peft's adapter directory of the LLM inside a saved adapter."""
PROJECTOR_FILE = "projector.safetensors"
MODEL_CONFIG_FILE = "model_config.yaml"
SETTINGS_FILE = "lora.json"
BASE_DIR = "base"
"""The base model inside a saved adapter, when its config does not pin its weights."""


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ImportError('LoRA needs peft: pip install -e ".[lora]"') from error
    return peft


def _lora_config(settings: LoraSettings, target_modules: str | list[str]) -> Any:
    peft = _peft()
    return peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules,
        bias="none",
    )


def _quantized_llm(model: nn.Module) -> nn.Module:
    """The LLM reloaded with its linear layers in 4-bit NF4 (bitsandbytes, double quantisation,
    compute in bf16) on the current CUDA device, every other weight in bf16. The weights go through a
    temporary directory: transformers quantises while loading.

    Departure from the QLoRA recipe as peft packages it: peft's ``prepare_model_for_kbit_training``
    is not called, because it casts every weight left unquantised to float32, and a Mamba-1 LLM
    keeps 40 % of its weights unquantised (``QUANTIZATION_SKIPS``) plus its embeddings and LM head,
    whose float32 activations then outweigh what 4 bits save (measured on an H200, MambaVLM-2.8B,
    micro-batch 4 x 1522 tokens: 68.7 GiB peak with it, LoRA in bf16 30.4). What else it does is done
    here already: the base is frozen (``LoraTrainable``), and the norms compute in float32 inside.
    The reloaded LLM keeps the training mode of the one it replaces (``from_pretrained`` returns a
    model in eval mode, where transformers' Mamba mixer leaves mamba_ssm's fused training kernel).
    """
    if not torch.cuda.is_available():
        raise ConfigError("lora.qlora: true loads the LLM in 4 bit with bitsandbytes, which needs CUDA: set "
                          "lora.qlora=false on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError('qlora: true needs bitsandbytes: pip install -e ".[qlora]"') from error
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=QUANTIZATION_SKIPS.get(model.config.llm.family, ["lm_head"]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.llm.save_pretrained(tmp)
        quantized = type(model.llm).from_pretrained(
            tmp, quantization_config=quantization, device_map={"": torch.cuda.current_device()}, dtype=torch.bfloat16
        )
    return quantized.requires_grad_(False).train(model.llm.training)  # from_pretrained returns eval mode


FAMILY_TARGETS: dict[str, str | list[str]] = {
    "mamba": ["in_proj"],
    "mamba2": ["in_proj"],
    "llama": "all-linear",
    "hybrid_llama": "all-linear",
}
"""Default ``target_modules`` per ``llm.family``. Mamba-1 trains on CUDA through mixers that read
``x_proj`` and ``dt_proj`` weights directly (the Triton-scan mixer, and mamba_ssm's fused
``mamba_inner_fn``, which reads ``out_proj``'s too), so adapters there would be skipped; peft refuses ``out_proj`` and ``conv1d`` for the Mamba model types."""

BYPASSED_BY_FUSED_KERNEL = frozenset({"x_proj", "dt_proj", "out_proj", "conv1d"})

QUANTIZATION_SKIPS: dict[str, list[str]] = {"mamba": ["x_proj", "dt_proj", "out_proj", "lm_head"]}
"""Linear layers QLoRA keeps in bf16, per family: the Mamba-1 weights the fused training kernel reads
raw (a 4-bit packed weight there would be garbage), and the LM head (as QLoRA keeps it)."""


def target_modules(settings: LoraSettings, family: str) -> str | list[str]:
    """The adapters' target modules: ``settings.target_modules``, or the family's default. Raises
    ConfigError for a Mamba-1 target the fused training kernel bypasses."""
    targets = settings.target_modules if settings.target_modules is not None else FAMILY_TARGETS[family]
    if family == "mamba":
        named = {targets} if isinstance(targets, str) else set(targets)
        bypassed = sorted(named & BYPASSED_BY_FUSED_KERNEL) or (["x_proj", "dt_proj", "out_proj"] if targets == "all-linear" else [])
        if bypassed:
            raise ConfigError(
                f"lora.target_modules {targets!r}: {bypassed} of a Mamba-1 LLM are read as raw weights by "
                "mamba_ssm's fused training kernel on CUDA, so adapters there would not train; use [in_proj]"
            )
    return targets


def check_targets_exist(llm: nn.Module, targets: str | list[str]) -> None:
    """Each name of a ``lora.target_modules`` list must name a module of ``llm`` as peft matches names
    (the whole name, or its last dotted parts); a string (``"all-linear"``, a regex) is peft's to match.

    Raises:
        ConfigError: naming the missing targets and the LLM's linear layers.
    """
    if isinstance(targets, str):
        return
    names = [name for name, _ in llm.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in llm.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"lora.target_modules: {missing} name no module of the {type(llm).__name__}; "
                          f"its linear layers are {linear}")


def apply_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Wrap ``model.llm`` in a peft LoRA model (4-bit base with ``settings.qlora``) and, with
    ``settings.projector == "lora"``, add adapters to the projector's linear layers. In place.

    Raises ImportError without peft (or bitsandbytes for QLoRA), RuntimeError for QLoRA without
    CUDA, ValueError for target modules the LLM cannot train through (``target_modules``), and
    ConfigError for names no module of the LLM has (listing its linear layers' names).
    """
    peft = _peft()
    targets = target_modules(settings, model.config.llm.family)
    check_targets_exist(model.llm, targets)
    llm = _quantized_llm(model) if settings.qlora else model.llm
    model.llm = peft.get_peft_model(llm, _lora_config(settings, targets))
    if settings.projector == "lora":
        peft.inject_adapter_in_model(_lora_config(settings, "all-linear"), model.projector)


@dataclass(frozen=True)
class LoraTrainable:
    """The trainer's policy under LoRA: the adapters train, and the projector too with
    ``projector: full``; everything else is frozen. Returns the names of the parameters that train."""

    settings: LoraSettings

    def __call__(self, model: nn.Module) -> set[str]:
        for name, param in model.named_parameters():
            adapter = "lora_" in name
            full_projector = self.settings.projector == "full" and name.startswith("projector.")
            param.requires_grad_(adapter or full_projector)
        return {name for name, p in model.named_parameters() if p.requires_grad}


def _projector_state(model: nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """What of the projector trains: all of it (``full``), its adapters (``lora``), nothing (``frozen``)."""
    if settings.projector == "frozen":
        return {}
    state = model.projector.state_dict()
    if settings.projector == "lora":
        state = {k: v for k, v in state.items() if "lora_" in k}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model under the adapters, in the plain MambaVLM's names (peft's
    ``base_model.model.`` and ``.base_layer`` removed, adapter tensors dropped)."""
    state = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace("llm.base_model.model.", "llm.").replace(".base_layer.", ".")
        state[key] = value
    return state


def reproducible(model: nn.Module) -> bool:
    """Whether the base model can be rebuilt from its YAML config alone: pretrained LLM and encoders."""
    spec = model.config.spec
    return spec.llm.source is not None and all(encoder.weights is not None for encoder in spec.vision.encoders)


def save_adapter(model: nn.Module, settings: LoraSettings, path: str | Path) -> Path:
    """Write the adapters of a LoRA-trained MambaVLM, atomically: ``llm_adapter/`` (peft's files),
    ``projector.safetensors`` (the projector's trained weights), ``lora.json`` (the settings),
    ``model_config.yaml`` (the base model's YAML config) and, when that config does not pin the base
    (a random-init LLM or encoder), ``base/``: the base model itself (``save_pretrained``; not under
    QLoRA, whose LLM is 4-bit: a warning says to merge with ``--base``)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        model.llm.save_pretrained(tmp / ADAPTER_DIR)
        save_file(_projector_state(model, settings), str(tmp / PROJECTOR_FILE), metadata={"format": "pt"})
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings.model_dump(mode="json"), indent=1))
        (tmp / MODEL_CONFIG_FILE).write_text(dump_yaml(model.config.spec.model_dump(mode="json")))
        if not reproducible(model) and settings.qlora:
            logger.warning(
                "%s: the base model is not pinned by its config and its LLM is 4-bit here, so it is not saved; "
                "merge with train/merge_lora.py --base (the model the run started from)", path
            )
        elif not reproducible(model):
            with torch.device("meta"):  # the index buffers are built real (MambaProjectorLayer)
                base = MambaVLM(copy.deepcopy(model.config))
            base.load_state_dict(base_state_dict(model), assign=True)
            base.attach_tokenizer(model.tokenizer)
            base.save_pretrained(tmp / BASE_DIR)
    return path


def load_adapter(model: nn.Module, path: str | Path) -> LoraSettings:
    """Put the adapters saved at ``path`` on a base MambaVLM (in place); returns their settings. Raises
    ValueError naming the adapter and the first mismatches where the base is not the model the adapters
    were trained on (another LLM width, another projector)."""
    peft = _peft()
    path = Path(path)
    settings = LoraSettings.model_validate_json((path / SETTINGS_FILE).read_text())
    try:
        model.llm = peft.PeftModel.from_pretrained(model.llm, path / ADAPTER_DIR)
    except RuntimeError as err:  # load_state_dict's size mismatches, one line per tensor
        if "Error(s) in loading state_dict" not in str(err):
            raise
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        shown = "; ".join(details[:2]) + (f"; and {len(details) - 2} more" if len(details) > 2 else "")
        raise ValueError(f"cannot load the adapter {path} onto this base: its LLM is not the one the adapters were "
                         f"trained on ({shown})") from None
    if settings.projector == "lora":
        peft.inject_adapter_in_model(_lora_config(settings, "all-linear"), model.projector)
    state = load_file(str(path / PROJECTOR_FILE))
    own = model.projector.state_dict()
    problems = [f"projector.{k}: not in the model" for k in state if k not in own]
    problems += [f"projector.{k}: shape {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and own[k].shape != v.shape]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"cannot load the adapter {path} onto this base: its projector is not the one the adapters "
                         f"were trained with ({shown})")
    model.projector.load_state_dict(state, strict=False)
    return settings


def merge_adapter(model: nn.Module, settings: LoraSettings) -> None:
    """Fold the adapters into the base weights (peft's ``merge_and_unload``), in place: ``model.llm``
    becomes the plain transformers LM again and the projector's linear layers plain ``nn.Linear``."""
    peft = _peft()
    model.llm = model.llm.merge_and_unload()
    if settings.projector == "lora":
        for name, module in list(model.projector.named_modules()):
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = model.projector.get_submodule(parent_name) if parent_name else model.projector
                setattr(parent, child, module.get_base_layer())
