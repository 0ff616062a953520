from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mambavlm.scan import (
    gather_scans,
    inverse_orders,
    merge_scans,
    plot_scan_orders,
    scan_orders,
)
from tests.conftest import ROOT

CROSS_CAT_2x3_TWO_MAPS = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11],
    [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6],
    [5, 2, 4, 1, 3, 0, 11, 8, 10, 7, 9, 6],
]
CROSS_STITCH_2x3_TWO_MAPS = [
    [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11],
    [0, 6, 3, 9, 1, 7, 4, 10, 2, 8, 5, 11],
    [5, 11, 4, 10, 3, 9, 2, 8, 1, 7, 0, 6],
    [5, 11, 2, 8, 4, 10, 1, 7, 3, 9, 0, 6],
]
SHAPES = [(2, 3, 2), (3, 5, 1), (7, 2, 3), (4, 4, 2), (1, 6, 3), (5, 1, 2)]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("cross-cat", CROSS_CAT_2x3_TWO_MAPS), ("cross-stitch", CROSS_STITCH_2x3_TWO_MAPS)],
)
def test_hand_worked_two_maps(mode, expected):
    orders = scan_orders(2, 3, num_maps=2, mode=mode)
    assert orders.dtype == torch.long
    assert torch.equal(orders, torch.tensor(expected))


@pytest.mark.parametrize(("h", "w"), [(2, 3), (3, 5), (7, 2), (4, 4), (1, 1)])
def test_single_map_is_vmamba_cross_scan(h, w):
    grid = torch.arange(h * w).reshape(h, w)
    row_major = grid.flatten()
    column_major = grid.transpose(-1, -2).flatten()
    expected = torch.stack([row_major, column_major, row_major.flip(-1), column_major.flip(-1)])
    assert torch.equal(scan_orders(h, w, 1, "cross-cat"), expected)
    assert torch.equal(scan_orders(h, w, 1, "cross-stitch"), expected)


@pytest.mark.parametrize(("h", "w", "num_maps"), SHAPES)
@pytest.mark.parametrize("mode", ["cross-cat", "cross-stitch", "1d"])
def test_rows_are_permutations_and_inverse_inverts(h, w, num_maps, mode):
    orders = scan_orders(h, w, num_maps, mode)
    length = num_maps * h * w
    assert orders.shape == (1 if mode == "1d" else 4, length)
    for row in orders:
        assert sorted(row.tolist()) == list(range(length))
    inverse = inverse_orders(orders)
    assert inverse.shape == orders.shape
    for k in range(orders.shape[0]):
        for i in range(length):
            assert inverse[k, orders[k, i]] == i


@pytest.mark.parametrize(("h", "w", "num_maps"), SHAPES)
def test_cross_stitch_groups_visit_one_position_in_every_map(h, w, num_maps):
    orders = scan_orders(h, w, num_maps, "cross-stitch")
    spatial = scan_orders(h, w, 1, "cross-cat")
    size = h * w
    for k in range(4):
        groups = orders[k].reshape(size, num_maps).tolist()
        for step, group in enumerate(groups):
            assert [token // size for token in group] == list(range(num_maps))
            assert [token % size for token in group] == [spatial[k, step].item()] * num_maps


@pytest.mark.parametrize(("h", "w", "num_maps"), SHAPES)
def test_cross_cat_scans_maps_in_order(h, w, num_maps):
    orders = scan_orders(h, w, num_maps, "cross-cat")
    spatial = scan_orders(h, w, 1, "cross-cat")
    size = h * w
    for k in range(4):
        for m in range(num_maps):
            assert torch.equal(orders[k, m * size : (m + 1) * size], spatial[k] + m * size)


def test_1d_is_the_sequence_order():
    assert torch.equal(scan_orders(2, 3, 2, "1d"), torch.tensor([list(range(12))]))


@pytest.mark.parametrize("mode", ["cross-cat", "cross-stitch", "1d"])
def test_gather_matches_per_direction_indexing(mode):
    torch.manual_seed(0)
    orders = scan_orders(3, 5, 2, mode)
    x = torch.randn(2, 30, 4)
    scans = gather_scans(x, orders)
    expected = torch.stack([x[:, orders[k]] for k in range(orders.shape[0])], dim=1)
    assert scans.shape == (2, orders.shape[0], 30, 4)
    assert torch.equal(scans, expected)


@pytest.mark.parametrize(("h", "w", "num_maps"), SHAPES)
@pytest.mark.parametrize("mode", ["cross-cat", "cross-stitch", "1d"])
def test_gather_then_merge_gives_k_times_x(h, w, num_maps, mode):
    torch.manual_seed(0)
    orders = scan_orders(h, w, num_maps, mode)
    x = torch.randn(3, num_maps * h * w, 5, dtype=torch.float64)
    merged = merge_scans(gather_scans(x, orders), inverse_orders(orders))
    assert merged.shape == x.shape
    torch.testing.assert_close(merged, orders.shape[0] * x)


def test_merge_puts_each_direction_back_before_summing():
    orders = scan_orders(2, 3, 2, "cross-stitch")
    steps = torch.arange(12, dtype=torch.float64)
    y = torch.stack([steps * 10**k for k in range(4)]).reshape(1, 4, 12, 1)
    merged = merge_scans(y, inverse_orders(orders))[0, :, 0]
    expected = torch.zeros(12, dtype=torch.float64)
    for k, row in enumerate(CROSS_STITCH_2x3_TWO_MAPS):
        for step, token in enumerate(row):
            expected[token] += step * 10**k
    assert torch.equal(merged, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"h": 0, "w": 3}, "h must be a positive int"),
        ({"h": 2, "w": -1}, "w must be a positive int"),
        ({"h": 2.0, "w": 3}, "h must be a positive int"),
        ({"h": True, "w": 3}, "h must be a positive int"),
        ({"h": 2, "w": 3, "num_maps": 0}, "num_maps must be a positive int"),
        ({"h": 2, "w": 3, "mode": "zigzag"}, "mode must be one of"),
    ],
)
def test_scan_orders_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        scan_orders(**kwargs)


def test_index_functions_reject_bad_inputs():
    orders = scan_orders(2, 3, 2)
    with pytest.raises(ValueError, match="permutation"):
        inverse_orders(torch.tensor([[0, 0, 1]]))
    with pytest.raises(ValueError, match=r"shape \(K, L\)"):
        inverse_orders(orders[0])
    with pytest.raises(ValueError, match="integer index"):
        inverse_orders(orders.float())
    with pytest.raises(ValueError, match="tokens but orders cover"):
        gather_scans(torch.randn(1, 10, 4), orders)
    with pytest.raises(ValueError, match=r"shape \(B, L, D\)"):
        gather_scans(torch.randn(12, 4), orders)
    with pytest.raises(ValueError, match="inverse has"):
        merge_scans(torch.randn(1, 4, 10, 4), inverse_orders(orders))
    with pytest.raises(ValueError, match=r"shape \(B, K, L, D\)"):
        merge_scans(torch.randn(4, 12, 4), inverse_orders(orders))


def test_plot_writes_png(tmp_path):
    path = plot_scan_orders(2, 3, 2, "cross-stitch", tmp_path / "scan.png")
    assert path == tmp_path / "scan.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1000
    with pytest.raises(ValueError, match="mode must be one of"):
        plot_scan_orders(2, 3, 2, "spiral", tmp_path / "bad.png")


def test_import_and_plot_leave_matplotlib_state_alone(tmp_path):
    script = (
        "import sys\n"
        "import mambavlm.scan as scan\n"
        "assert 'matplotlib' not in sys.modules, 'importing mambavlm.scan imported matplotlib'\n"
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        f"scan.plot_scan_orders(1, 2, 2, 'cross-cat', {str(tmp_path / 'p.png')!r})\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
