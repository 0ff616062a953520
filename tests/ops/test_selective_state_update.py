"""The one-token selective state update (the Mamba-1 decoding step) against the scan."""

from __future__ import annotations

import pytest
import torch

from mambavlm.ops.selective_scan import selective_scan_naive
from mambavlm.ops.selective_state_update import selective_state_update

pytestmark = pytest.mark.usefixtures("one_thread")


def test_selective_state_update_steps_equal_the_scan() -> None:
    """L one-token updates from a zero state give selective_scan_naive's outputs and last state."""
    torch.manual_seed(0)
    batch, dim, n, length = 2, 6, 4, 5
    u, delta, z = torch.randn(batch, dim, length), torch.randn(batch, dim, length), torch.randn(batch, dim, length)
    A, B, C = -torch.rand(dim, n) - 0.1, torch.randn(batch, n, length), torch.randn(batch, n, length)
    D, bias = torch.randn(dim), torch.randn(dim)
    expected, last = selective_scan_naive(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    state = torch.zeros(batch, dim, n)
    outputs = [
        selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True)
        for t in range(length)
    ]
    torch.testing.assert_close(torch.stack(outputs, dim=-1), expected)
    torch.testing.assert_close(state, last)
    with pytest.raises(ValueError, match="A must be"):
        selective_state_update(state, u[..., 0], delta[..., 0], A[:, :2], B[..., 0], C[..., 0])
