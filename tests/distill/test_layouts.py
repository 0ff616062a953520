"""Hybrid layouts: which layers of a 32-layer model become Mamba-2 under each rule (hand-written lists)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mambavlm.distill.config import load_distill_config
from mambavlm.distill.layouts import HybridLayout, mamba_layer_indices
from mambavlm.training.checkpoint import check_resumed_architecture
from tests.conftest import ROOT

ALL_32 = list(range(32))


def without(*attention: int) -> list[int]:
    return [i for i in ALL_32 if i not in attention]


# Hand-written from mmMamba sec. 4.5 / Tab. 6 (interval 4, 8 attention layers) and MaTVLM's configs.
EXPECTED_32 = {
    "head-interleaved:4": without(0, 4, 8, 12, 16, 20, 24, 28),
    "tail-interleaved:4": without(3, 7, 11, 15, 19, 23, 27, 31),
    "head-interleaved:8": without(0, 8, 16, 24),
    "head-stacked:8": [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
                       24, 25, 26, 27, 28, 29, 30, 31],
    "tail-stacked:8": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                       16, 17, 18, 19, 20, 21, 22, 23],
    "head-stacked:0": ALL_32,
    "ratio:0.125": [0, 8, 16, 24],
    "ratio:0.25": [0, 4, 8, 12, 16, 20, 24, 28],
    "ratio:0.5": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30],
    "list:1,2,5": [1, 2, 5],
    "list:31,0": [0, 31],
    "linear": ALL_32,
}


@pytest.mark.parametrize("text", sorted(EXPECTED_32))
def test_layouts_of_32_layers(text: str) -> None:
    layout = HybridLayout.parse(text)
    assert layout.mamba_layers(32) == EXPECTED_32[text]
    assert layout.attention_layers(32) == without(*EXPECTED_32[text])


def test_head_interleaved_4_is_mmmamba_hybrid() -> None:
    """mmMamba-hybrid: interval 4 on 32 layers = 8 attention + 24 Mamba-2."""
    layout = HybridLayout.parse("head-interleaved:4")
    assert len(layout.attention_layers(32)) == 8
    assert len(layout.mamba_layers(32)) == 24


def test_partial_last_block_and_function_form() -> None:
    # 10 layers in blocks of 4: [0-3] [4-7] [8-9]; the short last block keeps its last/first layer.
    assert mamba_layer_indices(10, "tail-interleaved", 4) == [0, 1, 2, 4, 5, 6, 8]
    assert mamba_layer_indices(10, "head-interleaved", 4) == [1, 2, 3, 5, 6, 7, 9]
    # 25 % of 6 layers rounds to 2, spread at 0 and 3.
    assert mamba_layer_indices(6, "ratio", 0.25) == [0, 3]
    assert mamba_layer_indices(4, "list", [3, 1]) == [1, 3]


@pytest.mark.parametrize("text", ["head-interleaved:4", "ratio:0.25", "list:1,2,5", "linear", "tail-stacked:3"])
def test_string_round_trip(text: str) -> None:
    layout = HybridLayout.parse(text)
    assert str(layout) == text
    assert HybridLayout.model_validate(layout.model_dump()) == layout
    assert HybridLayout.model_validate({"rule": layout.rule, "value": layout.value}) == layout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("diagonal:4", "unknown rule 'diagonal'"),
        ("head-interleaved", "needs a value"),
        ("head-interleaved:1", "block size must be at least 2"),
        ("head-interleaved:x", "must be an integer"),
        ("ratio:1.5", "(0, 1]"),
        ("ratio:0", "(0, 1]"),
        ("list:1,1", "repeated"),
        ("list:1,a", "comma-separated integers"),
        ("linear:2", "takes no value"),
        ("head-stacked:-1", "cannot be negative"),
    ],
)
def test_bad_layout_strings(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        HybridLayout.parse(text)


def test_layouts_that_do_not_fit_the_model() -> None:
    with pytest.raises(ValueError, match="at most 31 attention layers"):
        HybridLayout.parse("head-stacked:32").mamba_layers(32)
    with pytest.raises(ValueError, match=r"\[4\] are not layers of a 4-layer model"):
        HybridLayout.parse("list:0,4").mamba_layers(4)
    with pytest.raises(ValueError, match="rounds to 0"):
        HybridLayout.parse("ratio:0.1").mamba_layers(4)



def test_a_list_layout_is_written_in_ascending_order(tmp_path: Path) -> None:
    """``list:3,1`` and ``list:1,3`` convert the same layers, but were written as given: a run resumed with
    the other spelling was refused as another student, and the saved hybrid's config kept the user's order."""
    assert str(HybridLayout.parse("list:5,1")) == "list:1,5"
    tiny = ROOT / "configs/distill/tiny.yaml"
    saved = load_distill_config(tiny, ["layout=list:3,1"]).model_dump(mode="json")
    assert saved["layout"] == "list:1,3"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    now = load_distill_config(tiny, ["layout=list:1,3"]).model_dump(mode="json")
    check_resumed_architecture(tmp_path / "checkpoint-5", "config.yaml", now, ("layout",), "resume_from")
