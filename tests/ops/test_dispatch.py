"""Kernel dispatch: which calls go to mamba_ssm / causal_conv1d."""

from __future__ import annotations

import types

import pytest
import torch

from mambavlm.ops import dispatch
from mambavlm.ops.dispatch import DISABLE_KERNELS_ENV, kernels_available, use_kernels


def test_use_kernels_follows_device_availability_and_env(monkeypatch):
    available = kernels_available()
    assert set(available) == {"mamba_ssm", "causal_conv1d"}
    assert all(isinstance(v, bool) for v in available.values())
    assert not use_kernels(torch.zeros(1), "mamba_ssm")  # CPU tensors never use kernels

    monkeypatch.setattr(dispatch, "kernels_available", lambda: {"mamba_ssm": True, "causal_conv1d": False})
    cuda_tensor = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv(DISABLE_KERNELS_ENV, raising=False)
    assert use_kernels(cuda_tensor, "mamba_ssm")
    assert not use_kernels(cuda_tensor, "causal_conv1d")
    monkeypatch.setenv(DISABLE_KERNELS_ENV, "0")
    assert use_kernels(cuda_tensor, "mamba_ssm")
    monkeypatch.setenv(DISABLE_KERNELS_ENV, "1")
    assert not use_kernels(cuda_tensor, "mamba_ssm")
    with pytest.raises(ValueError, match="unknown kernel package 'triton'"):
        use_kernels(cuda_tensor, "triton")
