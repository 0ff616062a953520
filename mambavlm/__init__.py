"""mambavlm: build, train and distill Mamba-based vision-language models.

Importing it registers ``MambaVLMConfig``, ``MambaVLM`` and its processors with transformers'
``AutoConfig``, ``AutoModelForImageTextToText``, ``AutoImageProcessor`` and ``AutoProcessor``, and the
hybrid LLM (``hybrid_llama``: a text-only distilled student) with ``AutoConfig`` and
``AutoModelForCausalLM``. The public API is small; everything else is importable from its own module
(``mambavlm.vision``, ``mambavlm.scan``, ``mambavlm.ops``, ``mambavlm.projector``, ``mambavlm.llm``,
``mambavlm.data``, ``mambavlm.distill``).
"""

from mambavlm.versions import check_installed_versions

check_installed_versions()

from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from mambavlm.config import ConfigError, ModelConfig, load_config  # noqa: E402
from mambavlm.configuration import MambaVLMConfig  # noqa: E402
from mambavlm.llm.hybrid import HybridLlamaConfig, HybridLlamaForCausalLM  # noqa: E402
from mambavlm.model import MambaVLM, build_model  # noqa: E402
from mambavlm.processing import MambaVLMImageProcessor, MambaVLMProcessor  # noqa: E402
from mambavlm.projector import build_projector  # noqa: E402
from mambavlm.scan import inverse_orders, plot_scan_orders, scan_orders  # noqa: E402
from mambavlm.vision.long_sequence import VisualLongSequence  # noqa: E402

AutoConfig.register(MambaVLMConfig.model_type, MambaVLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(MambaVLMConfig, MambaVLM, exist_ok=True)
AutoImageProcessor.register(
    MambaVLMConfig,
    image_processor_classes={"pil": MambaVLMImageProcessor, "torchvision": MambaVLMImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(MambaVLMConfig, MambaVLMProcessor, exist_ok=True)
AutoConfig.register(HybridLlamaConfig.model_type, HybridLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridLlamaConfig, HybridLlamaForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "MambaVLM",
    "MambaVLMConfig",
    "MambaVLMImageProcessor",
    "MambaVLMProcessor",
    "ModelConfig",
    "VisualLongSequence",
    "build_model",
    "build_projector",
    "inverse_orders",
    "load_config",
    "plot_scan_orders",
    "scan_orders",
]
