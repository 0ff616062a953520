"""Hybrid layouts: which decoder layers of a Transformer become Mamba-2 layers.

Rules (``num_layers`` = L; the parameter of the interleaved and stacked rules counts *attention*
layers or block sizes, as in mmMamba sec. 4.5 / 5.4, Tab. 6):

- ``head-interleaved:k`` (mmMamba's default): the layers are cut into blocks of k; the FIRST layer of
  every block keeps attention, the rest become Mamba-2. k = 4 on 32 layers: attention at 0, 4, ..., 28,
  24 Mamba-2 layers.
- ``tail-interleaved:k``: the same blocks, attention in the LAST layer of each block (3, 7, ..., 31);
  a shorter final block keeps attention in its last layer.
- ``head-stacked:n``: n attention layers stacked at the bottom of the network (the input side,
  layers 0 .. n-1); layers n .. L-1 become Mamba-2. mmMamba Tab. 6 uses n = 8.
- ``tail-stacked:n``: n attention layers at the top (the output side, L-n .. L-1); layers 0 .. L-n-1
  become Mamba-2.
- ``ratio:r`` (MaTVLM): round(r * L) Mamba-2 layers spread evenly, at floor(i * L / m) for
  i = 0 .. m-1: r = 0.25 on 32 layers gives 0, 4, ..., 28 and r = 0.5 gives 0, 2, ..., 30, the lists
  of MaTVLM's public configs (its 12.5 % config lists 0, 6, 12, 18, which is not evenly spread; this
  rule gives 0, 8, 16, 24).
- ``list:i,j,...``: exactly these layers.
- ``linear``: every layer (mmMamba-linear).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from pydantic import model_serializer, model_validator

from mambavlm.config import StrictModel

__all__ = ["LAYOUT_RULES", "HybridLayout", "check_layout_value", "mamba_layer_indices"]

LayoutRule = Literal[
    "head-interleaved", "tail-interleaved", "head-stacked", "tail-stacked", "ratio", "list", "linear"
]

LAYOUT_RULES: tuple[str, ...] = get_args(LayoutRule)

_INT_RULES = ("head-interleaved", "tail-interleaved", "head-stacked", "tail-stacked")

_EXAMPLES = "e.g. 'head-interleaved:4', 'ratio:0.25', 'list:1,2,5', 'linear'"


def mamba_layer_indices(
    num_layers: int, rule: str, value: int | float | Sequence[int] | None = None
) -> list[int]:
    """Sorted indices of the layers that become Mamba-2 under ``rule`` (see the module docstring).

    ``value`` is k for the interleaved rules, the number of attention layers for the stacked rules,
    the Mamba-2 fraction for ``ratio``, the indices for ``list`` and None for ``linear``.
    """
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    check_layout_value(rule, value)
    if rule == "linear":
        return list(range(num_layers))
    if rule == "head-interleaved":
        attention = set(range(0, num_layers, value))
    elif rule == "tail-interleaved":
        attention = {min(start + value - 1, num_layers - 1) for start in range(0, num_layers, value)}
    elif rule in ("head-stacked", "tail-stacked"):
        if value >= num_layers:
            raise ValueError(
                f"layout {rule}:{value}: a {num_layers}-layer model has room for at most "
                f"{num_layers - 1} attention layers beside one Mamba-2 layer"
            )
        attention = set(range(value)) if rule == "head-stacked" else set(range(num_layers - value, num_layers))
    elif rule == "ratio":
        count = round(value * num_layers)
        if count == 0:
            raise ValueError(f"layout ratio:{value} on {num_layers} layers rounds to 0 Mamba-2 layers")
        return [i * num_layers // count for i in range(count)]
    else:
        outside = [i for i in value if i >= num_layers]
        if outside:
            raise ValueError(
                f"layout list: indices {outside} are not layers of a {num_layers}-layer model (0 .. {num_layers - 1})"
            )
        return sorted(value)
    return [i for i in range(num_layers) if i not in attention]


def check_layout_value(rule: str, value: Any) -> None:
    """Raise ValueError unless ``value`` fits ``rule`` (independently of the number of layers)."""
    if rule not in LAYOUT_RULES:
        raise ValueError(f"unknown layout rule {rule!r}; expected one of {', '.join(LAYOUT_RULES)}")
    if rule == "linear":
        if value is not None:
            raise ValueError(f"layout 'linear' takes no value, got {value!r}")
    elif rule in _INT_RULES:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"layout {rule!r} needs an integer, got {value!r}")
        if rule.endswith("interleaved") and value < 2:
            raise ValueError(
                f"layout {rule}:{value}: the block size must be at least 2 (blocks of 1 keep attention everywhere)"
            )
        if rule.endswith("stacked") and value < 0:
            raise ValueError(f"layout {rule}:{value}: the number of attention layers cannot be negative")
    elif rule == "ratio":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"layout ratio must be a number in (0, 1], the Mamba-2 fraction; got {value!r}")
    else:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            raise ValueError(f"layout 'list' needs a non-empty list of layer indices, got {value!r}")
        bad = [i for i in value if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise ValueError(f"layout list: {bad} are not layer indices (non-negative integers)")
        if len(set(value)) != len(value):
            raise ValueError(f"layout list: repeated indices in {list(value)}")


class HybridLayout(StrictModel):
    """A layout rule and its value; validated from ``"rule:value"`` strings or mappings.

    ``HybridLayout.parse("head-interleaved:4")``, ``"ratio:0.25"``, ``"list:1,2,5"``, ``"linear"``;
    ``str(layout)`` gives the same string back, a list's indices in ascending order (``"list:5,1"`` is
    ``"list:1,5"``: the same layers, so the same student in a checkpoint's config and a saved hybrid's).
    """

    rule: LayoutRule
    value: int | float | list[int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        """A ``"rule:value"`` string parsed; a mapping or a HybridLayout as it is. Raises ValueError for
        anything else (``layout=4``, ``layout=0.25``), naming the form a layout takes."""
        if isinstance(data, str):
            return _parse(data)
        if not isinstance(data, (dict, HybridLayout)):
            raise ValueError(f"a layout is written 'RULE:VALUE', RULE one of {', '.join(LAYOUT_RULES)} ({_EXAMPLES})")
        return data

    @model_validator(mode="after")
    def _check(self) -> HybridLayout:
        check_layout_value(self.rule, self.value)
        return self

    @model_serializer
    def _to_string(self) -> str:
        return str(self)

    @classmethod
    def parse(cls, text: str) -> HybridLayout:
        """``"rule:value"`` -> HybridLayout; a bad string is a ValueError naming the problem."""
        return cls.model_validate(text)

    def mamba_layers(self, num_layers: int) -> list[int]:
        """Sorted indices of the layers that become Mamba-2 in a ``num_layers``-layer model."""
        return mamba_layer_indices(num_layers, self.rule, self.value)

    def attention_layers(self, num_layers: int) -> list[int]:
        """Sorted indices of the layers that keep attention."""
        mamba = set(self.mamba_layers(num_layers))
        return [i for i in range(num_layers) if i not in mamba]

    def __str__(self) -> str:
        if self.rule == "linear":
            return "linear"
        if self.rule == "list":
            return "list:" + ",".join(str(i) for i in sorted(self.value))
        return f"{self.rule}:{self.value}"


def _parse(text: str) -> dict[str, Any]:
    """``"rule:value"`` -> {"rule", "value"}; raises ValueError naming the problem."""
    text = text.strip()
    rule, sep, raw = text.partition(":")
    rule, raw = rule.strip(), raw.strip()
    if rule not in LAYOUT_RULES:
        raise ValueError(
            f"layout {text!r}: unknown rule {rule!r}; expected 'RULE:VALUE' with RULE one of "
            f"{', '.join(LAYOUT_RULES)} ({_EXAMPLES})"
        )
    if rule == "linear":
        if sep:
            raise ValueError(f"layout {text!r}: 'linear' takes no value")
        return {"rule": rule}
    if not raw:
        raise ValueError(f"layout {text!r}: rule {rule!r} needs a value after ':'")
    try:
        if rule in _INT_RULES:
            return {"rule": rule, "value": int(raw)}
        if rule == "ratio":
            return {"rule": rule, "value": float(raw)}
        return {"rule": rule, "value": [int(part) for part in raw.split(",")]}
    except ValueError:
        kind = {"ratio": "a number", "list": "comma-separated integers"}.get(rule, "an integer")
        raise ValueError(f"layout {text!r}: the value of {rule!r} must be {kind}, got {raw!r}") from None
