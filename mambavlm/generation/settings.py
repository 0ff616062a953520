"""What one generation run does: length, greedy or sampled, stop tokens, resolved like HF ``generate``.

Keyword arguments win (an explicit None too: ``eos_token_id=None`` turns EOS stopping off), then
the model's ``generation_config``, then transformers' defaults (temperature 1.0, top_k 50, top_p
1.0). Only the options the static-state decoder implements are accepted; anything else (beam
search, repetition penalty, ...) is an error that names it, and ``accepts`` tells a caller
beforehand so it can use HF ``generate`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

__all__ = ["GenerationSettings"]

SUPPORTED_KWARGS = frozenset(
    {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id"}
)
"""The ``generate`` keyword arguments the static-state decoder implements."""

HF_SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
"""transformers' values when neither the call nor the generation config sets one."""

NEUTRAL_CONFIG_FIELDS: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
}
"""Generation-config fields that change the tokens, with the values at which they do nothing."""


def _token_ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
    """None, one id or a list of ids -> a tuple of ids."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class GenerationSettings:
    """max_new_tokens new tokens, greedy or sampled (temperature, then top-k, then top-p, as HF).

    Raises ValueError for max_new_tokens < 1 and, when sampling, temperature <= 0, top_k < 0 or top_p outside
    (0, 1]; greedy decoding ignores the sampling settings, as HF ``generate`` does (LLaVA's scripts pass
    ``temperature=0, do_sample=False``).

    Generation stops early once every row has produced one of ``eos_token_ids``; a finished row gets
    ``pad_token_id`` (the first EOS id when None) for the rest, as in HF ``generate``.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.do_sample:  # as HF: greedy decoding ignores the sampling settings (LLaVA passes temperature=0)
            return
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] when sampling, got {self.top_p}")

    @property
    def fill_token_id(self) -> int | None:
        """The token written after a row's EOS: pad_token_id, else the first EOS id."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @staticmethod
    def unsupported(kwargs: Mapping[str, Any], generation_config: GenerationConfig | None = None) -> list[str]:
        """Names of the keyword arguments and generation-config fields the decoder cannot honour."""
        problems = [f"argument {key!r}" for key in kwargs if key not in SUPPORTED_KWARGS]
        if generation_config is not None:
            problems += [
                f"generation_config.{name}={getattr(generation_config, name)!r}"
                for name, neutral in NEUTRAL_CONFIG_FIELDS.items()
                if getattr(generation_config, name, None) not in neutral
            ]
        return problems

    @classmethod
    def accepts(cls, kwargs: Mapping[str, Any], generation_config: GenerationConfig | None = None) -> bool:
        """Whether ``from_generate_kwargs`` can honour these arguments and config."""
        return not cls.unsupported(kwargs, generation_config)

    @classmethod
    def from_generate_kwargs(
        cls, kwargs: Mapping[str, Any], generation_config: GenerationConfig | None = None
    ) -> GenerationSettings:
        """HF ``generate`` keyword arguments (+ the model's generation config) -> settings.

        ``max_new_tokens`` must come from the call or the config; an unsupported argument or a
        token-changing config field is a ValueError naming it.
        """
        problems = cls.unsupported(kwargs, generation_config)
        if problems:
            raise ValueError(
                "the static-state decoder does not implement " + ", ".join(problems)
                + f"; it supports {sorted(SUPPORTED_KWARGS)} (use HF generate for the rest)"
            )

        def resolve(name: str, default: Any) -> Any:
            if name in kwargs:  # as in HF, an explicit None (e.g. eos_token_id=None) overrides the config
                value = kwargs[name]
            else:
                value = getattr(generation_config, name, None) if generation_config is not None else None
            return default if value is None else value

        max_new_tokens = resolve("max_new_tokens", None)
        if max_new_tokens is None:
            raise ValueError("max_new_tokens is required (neither the call nor the generation config sets it)")
        return cls(
            max_new_tokens=int(max_new_tokens),
            do_sample=bool(resolve("do_sample", False)),
            temperature=float(resolve("temperature", HF_SAMPLING_DEFAULTS["temperature"])),
            top_k=int(resolve("top_k", HF_SAMPLING_DEFAULTS["top_k"])),
            top_p=float(resolve("top_p", HF_SAMPLING_DEFAULTS["top_p"])),
            eos_token_ids=_token_ids(resolve("eos_token_id", None)),
            pad_token_id=resolve("pad_token_id", None),
        )
