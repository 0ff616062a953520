"""``MambaVLMConfig``: a whole MambaVLM as one transformers ``PretrainedConfig`` (``config.json``).

The YAML schema (``mambavlm.config.ModelConfig``) says how to *build* a model: which encoder weights
to fetch, which LLM checkpoint to read. A saved model needs only what its weights fit: this config
holds the vision and projector sections as the schema's pydantic objects (validated on the way in,
written as plain JSON), the LLM section (family, tokenizer, conversation template), the LLM's own
transformers config as ``text_config`` (the architecture, as LLaVA-HF / Idefics hold theirs), and
the longest sequence. ``max_sequence_length`` is the schema's ``max_length``: transformers 5 refuses a
model config holding ``max_length``, which it reserves for generation.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from mambavlm.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig, validate
from mambavlm.llm.factory import family_classes
from mambavlm.llm.tokenizer import IMAGE_TOKEN_INDEX

__all__ = ["MODEL_TYPE", "MambaVLMConfig"]

MODEL_TYPE = "mambavlm"
"""``model_type`` in ``config.json``; the key the Auto classes are registered under."""


def _section(schema: type, value: Any, name: str) -> Any:
    """A schema object from a dict (``config.json``) or the object itself; ConfigError naming bad keys."""
    if isinstance(value, schema):
        return value.model_copy(deep=True)
    if not isinstance(value, dict):
        raise TypeError(f"MambaVLMConfig.{name} must be a mapping or {schema.__name__}, got {type(value).__name__}")
    return validate(schema, value, source=f"MambaVLMConfig.{name}")


class MambaVLMConfig(PretrainedConfig):
    """Vision encoders + projector + LLM of one MambaVLM.

    Args:
        vision: ``VisionConfig`` (or its dict): the encoders (architecture; ``weights`` is ignored when
            a saved model loads, its weights come from the checkpoint) and their fusion.
        projector: ``ProjectorConfig`` (or its dict).
        llm: ``LLMConfig`` (or its dict): family, tokenizer, template. Its ``source`` and ``config``
            record how the model was first built; the architecture is ``text_config``.
        text_config: the LLM's transformers config (object or dict), of ``llm.family``'s config class.
        name: the model's name in logs and results.
        max_sequence_length: longest token sequence, visual tokens included.
        image_token_index: the placeholder id an image's positions hold in ``input_ids``.

    Raises ``ConfigError`` for a section that does not validate and ``ValueError`` for a
    ``text_config`` of another family. Default-constructed (no arguments, as transformers does to
    compare against defaults), every section is None.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vision: VisionConfig | dict[str, Any] | None = None,
        projector: ProjectorConfig | dict[str, Any] | None = None,
        llm: LLMConfig | dict[str, Any] | None = None,
        text_config: PretrainedConfig | dict[str, Any] | None = None,
        name: str = "mambavlm",
        max_sequence_length: int = 2048,
        image_token_index: int = IMAGE_TOKEN_INDEX,
        **kwargs: Any,
    ) -> None:
        self.vision = None if vision is None else _section(VisionConfig, vision, "vision")
        self.projector = _section(ProjectorConfig, projector if projector is not None else {}, "projector")
        self.llm = None if llm is None else _section(LLMConfig, llm, "llm")
        if isinstance(text_config, dict):
            if self.llm is None:
                raise ValueError("MambaVLMConfig: a text_config needs the llm section (its family)")
            config_cls = family_classes(self.llm.family)[0]
            fields = {k: v for k, v in text_config.items() if k != "model_type"}
            text_config = config_cls(**fields)
        if text_config is not None and self.llm is not None:
            expected = family_classes(self.llm.family)[0]
            if not isinstance(text_config, expected):
                raise ValueError(
                    f"MambaVLMConfig: text_config is a {type(text_config).__name__}, "
                    f"llm.family {self.llm.family!r} needs a {expected.__name__}"
                )
        self.text_config = text_config
        self.name = name
        self.max_sequence_length = max_sequence_length
        self.image_token_index = image_token_index
        super().__init__(**kwargs)

    @classmethod
    def from_spec(cls, spec: ModelConfig, text_config: PretrainedConfig, **kwargs: Any) -> MambaVLMConfig:
        """The config of a model built from the YAML schema ``spec`` with LLM config ``text_config``."""
        return cls(
            vision=spec.vision,
            projector=spec.projector,
            llm=spec.llm,
            text_config=text_config,
            name=spec.name,
            max_sequence_length=spec.max_length,
            **kwargs,
        )

    @property
    def spec(self) -> ModelConfig:
        """This config as the YAML schema (``max_length`` = ``max_sequence_length``), e.g. to write
        ``config.yaml`` beside a run's outputs."""
        if self.vision is None or self.llm is None:
            raise ValueError("a default-constructed MambaVLMConfig has no vision / llm section")
        return ModelConfig(
            name=self.name,
            vision=self.vision,
            projector=self.projector,
            llm=self.llm,
            max_length=self.max_sequence_length,
        )

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        """The LLM's config (transformers asks for it in ``generate`` and cache set-up)."""
        return self.text_config if self.text_config is not None else super().get_text_config(*args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the pydantic sections and ``text_config`` as plain dicts."""
        out = super().to_dict()
        for key in ("vision", "projector", "llm"):
            value = getattr(self, key)
            out[key] = None if value is None else value.model_dump(mode="json")
        if self.text_config is not None:
            out["text_config"] = self.text_config.to_dict()
        return out
