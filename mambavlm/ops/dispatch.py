"""The one rule that picks a CUDA kernel package over the PyTorch path of an op.

A kernel is used when its package imports, the tensor lives on a CUDA device, and the environment
variable ``MAMBAVLM_DISABLE_KERNELS`` is not ``"1"``. The packages are optional and CUDA-only, so
they are imported lazily, once, and a failed import only means "not available".
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

from torch import Tensor

__all__ = ["DISABLE_KERNELS_ENV", "KERNEL_MODULES", "kernels_available", "triton_available", "triton_runs_on", "use_kernels"]

logger = logging.getLogger(__name__)

DISABLE_KERNELS_ENV = "MAMBAVLM_DISABLE_KERNELS"

KERNEL_MODULES: dict[str, str] = {
    "mamba_ssm": "mamba_ssm.ops.selective_scan_interface",
    "causal_conv1d": "causal_conv1d",
}
"""Kernel package name -> the module whose import proves the package's kernels load."""


def _importable(package: str, module: str) -> bool:
    """True when ``module`` imports; a package that is installed but fails to load is logged."""
    if importlib.util.find_spec(package) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken CUDA extension can raise more than ImportError
        logger.warning("%s is installed but %s failed to import (%s); using PyTorch ops", package, module, error)
        return False
    return True


@functools.cache
def kernels_available() -> dict[str, bool]:
    """Which kernel packages import here: ``{"mamba_ssm": bool, "causal_conv1d": bool}`` (cached)."""
    return {package: _importable(package, module) for package, module in KERNEL_MODULES.items()}


def use_kernels(t: Tensor, name: str) -> bool:
    """Whether the op on ``t`` should call kernel package ``name`` ("mamba_ssm" or "causal_conv1d")."""
    if name not in KERNEL_MODULES:
        raise ValueError(f"unknown kernel package {name!r}; expected one of {sorted(KERNEL_MODULES)}")
    if not t.is_cuda or os.environ.get(DISABLE_KERNELS_ENV) == "1":
        return False
    return kernels_available()[name]


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it ships with torch's Linux wheels)."""
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(t: Tensor) -> bool:
    """Whether this project's Triton kernels can run on ``t``: Triton on a CUDA tensor, or any tensor
    under Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them)."""
    return triton_available() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
