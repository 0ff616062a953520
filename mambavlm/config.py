"""Typed configuration schemas, YAML loading and ``key=value`` overrides.

Configs are data: a YAML file is validated against these pydantic models, so an unknown key or a
wrong type is an error that names it (``projector.scan_mode: Input should be 'cross-stitch', ...``).
Command-line overrides use dotted paths: ``projector.d_state=32 llm.source=/ckpt/mamba``.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "ConfigError",
    "EncoderConfig",
    "VisionConfig",
    "ProjectorConfig",
    "LLMConfig",
    "ModelConfig",
    "apply_overrides",
    "deep_merge",
    "SectionChecks",
    "exception_line",
    "parse_yaml",
    "load_config",
    "load_yaml",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


class StrictModel(BaseModel):
    """Base schema: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


ENCODER_LIBRARIES = ("timm", "open_clip")
"""The libraries an encoder name can come from: ``'timm:<model>'`` or ``'open_clip:<model>'``."""


def split_encoder_name(name: str) -> tuple[str, str]:
    """``'library:model'`` -> (library, model). Raises ValueError without a known library prefix."""
    library, sep, model_name = name.partition(":")
    if not sep or not model_name:
        raise ValueError(f"encoder name {name!r} needs a library prefix: 'timm:<model>' or 'open_clip:<model>'")
    if library not in ENCODER_LIBRARIES:
        close = difflib.get_close_matches(library, ENCODER_LIBRARIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown library {library!r} in encoder name {name!r}{hint}; use one of {ENCODER_LIBRARIES}")
    return library, model_name


def check_encoder_model(library: str, model_name: str) -> None:
    """Raise ValueError, with the closest names, unless ``model_name`` is in the library's model
    registry (timm's ``is_model``, open_clip's ``list_models``; models registered at run time count)."""
    if library == "timm":
        import timm

        if timm.is_model(model_name):
            return
        known = timm.list_models()
    else:
        import open_clip

        known = open_clip.list_models()
        if model_name in known:
            return
    close = difflib.get_close_matches(model_name, known, n=5)
    raise ValueError(f"unknown {library} model {model_name!r}" + (f"; close matches: {', '.join(close)}" if close
                                                                   else "; no close match"))


class EncoderConfig(StrictModel):
    """One frozen vision encoder, created by name from timm or open_clip. The name is checked against
    the library's model registry when the config is validated, so a typo is a config error naming the
    key, before anything is built."""

    name: str = Field(description="'timm:<model>' or 'open_clip:<model>'")
    image_size: int = Field(384, gt=0, description="square input resolution in pixels")
    feature_layer: int = Field(-2, description="block whose output is used; -2 = second-to-last")
    weights: str | None = Field(
        None,
        description="None = random init; 'pretrained' = the library's default weights; "
        "a local file path; or an open_clip pretrained tag / timm 'hf-hub:' name",
    )
    frozen: bool = True
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra architecture kwargs (e.g. depth, embed_dim)"
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        check_encoder_model(*split_encoder_name(name))
        return name


class VisionConfig(StrictModel):
    """The encoders and how their patch grids are fused into one visual sequence."""

    encoders: list[EncoderConfig] = Field(min_length=1)
    fusion: Literal["sequence", "channel"] = Field(
        "sequence", description="'sequence' = visual long sequence (MambaVLM); 'channel' = Cobra"
    )
    target_grid: Literal["largest", "smallest", "first"] | list[int] = Field(
        "largest", description="grid all encoders are resampled to when their sizes differ"
    )
    image_resize_strategy: Literal["resize-naive", "letterbox", "resize-crop"] = Field(
        "resize-naive",
        description="one geometry for every encoder (Prismatic / Cobra): 'resize-naive' squashes to the "
        "square input (Cobra's DINOv2 + SigLIP default), 'letterbox' pads to a square first, "
        "'resize-crop' resizes the shorter side and takes the centre crop",
    )


class ProjectorConfig(StrictModel):
    """Maps the fused visual grids to the LLM's embedding width."""

    type: Literal["mamba", "mlp", "linear"] = "mamba"
    scan_mode: Literal["cross-stitch", "cross-cat", "1d"] = "cross-stitch"
    d_inner: int | None = Field(None, gt=0, description="SSM width; None = the LLM's hidden size")
    d_state: int = Field(16, gt=0)
    dt_rank: int | None = Field(None, gt=0, description="None = ceil(d_inner / 16)")
    conv_kernel: int = Field(3, gt=0, description="depthwise 2D conv kernel size")
    depth: int = Field(1, gt=0, description="number of Mamba projector layers")
    share_directions: bool = Field(False, description="one set of SSM parameters for all directions")


class LLMConfig(StrictModel):
    """The language model: architecture, weights, tokenizer and conversation template."""

    family: Literal["mamba", "mamba2", "llama", "hybrid_llama"]
    source: str | None = Field(
        None, description="hub name or local directory of weights; None = random init from `config`"
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="HF config fields: the architecture for random init / meta builds, "
        "and overrides when loading `source`",
    )
    tokenizer: str | None = Field(
        None, description="hub name, local directory, or 'builtin:tiny'; None = same as source"
    )
    template: Literal["plain", "vicuna_v1"] = "plain"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ModelConfig(StrictModel):
    """A whole MambaVLM: vision -> projector -> LLM."""

    name: str = "mambavlm"
    vision: VisionConfig
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    llm: LLMConfig
    max_length: int = Field(2048, gt=0, description="longest token sequence (visual + text)")


M = TypeVar("M", bound=BaseModel)


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for booleans and numbers, and no repeated keys.

    PyYAML follows YAML 1.1: ``no``, ``yes``, ``on`` and ``off`` are booleans there, so
    ``mixed_precision: no`` or the override ``train.mixed_precision=no`` would reach the schema as
    ``False`` instead of accelerate's ``"no"``; a float needs a dot, so ``1e-5`` stays a string (which
    a free-form mapping such as ``llm.config`` hands to transformers as ``'1e-5'``); and ``010`` is
    octal. Here only ``true`` / ``false`` are booleans, ``1e-5`` and ``.5`` are floats, ``010`` is 10,
    ``0o17`` 15 and ``0x1F`` 31 (the YAML 1.2 spec's core schema, section 10.3.2; ``1_000`` is a string).
    A key given twice in one mapping is an error naming both lines (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # PyYAML's own error names it
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found key {key!r} twice (first on line {first_line[key] + 1})", key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
ConfigLoader.add_implicit_resolver(  # before the floats: "1" is an int, not a float
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
ConfigLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)  # int(_, 10): "010" is ten


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.lstrip("+-") in (".inf", ".nan"):
        return float(text.replace(".", ""))
    return float(text)


ConfigLoader.add_constructor(_INT, _construct_int)
ConfigLoader.add_constructor(_FLOAT, _construct_float)


class Replace(dict):
    """A mapping written ``!replace {...}`` in a config file: it replaces the mapping of its ``base`` file
    at the same key instead of merging into it (``deep_merge``), e.g. an ``llm.config`` of another LLM
    family, whose base's architecture fields would otherwise stay."""


def _construct_replace(loader: yaml.SafeLoader, node: yaml.Node) -> Replace:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, "!replace takes a mapping", node.start_mark)
    return Replace(loader.construct_mapping(node, deep=True))


ConfigLoader.add_constructor("!replace", _construct_replace)


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes a string which either YAML 1.1 (PyYAML, other tools) or
    ``ConfigLoader``'s 1.2 rules would read as something else: ``"no"`` as 1.1 quotes it, and ``"1e5"``,
    which 1.1 leaves plain but ``ConfigLoader`` reads back as a float. A run's recorded config reads back
    as it was written, by either."""

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == "tag:yaml.org,2002:str":
            for other, regexp in ConfigLoader.yaml_implicit_resolvers.get(value[:1], []):
                if regexp.match(value):
                    return other
        return tag


def dump_yaml(data: Any) -> str:
    """``data`` as YAML text (keys in their order) that ``parse_yaml`` and PyYAML's ``safe_load`` both read
    back as ``data`` (``ConfigDumper``)."""
    return yaml.dump(data, Dumper=ConfigDumper, sort_keys=False)


def parse_yaml(text: str | IO[str]) -> Any:
    """A YAML document (a string or an open file) read with ``ConfigLoader``."""
    return yaml.load(text, Loader=ConfigLoader)


def load_yaml(
    path: str | Path, _seen: tuple[Path, ...] = (), path_keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a file that is not valid UTF-8 YAML or a non-mapping document is
    a ConfigError naming the file (and for bad YAML the line and column).

    A top-level ``base: other.yaml`` (relative to this file) is loaded first and this file's keys
    are merged over it (mappings merged recursively, other values replaced). File references are
    relative to the file that writes them, whichever file inherits it: a ``base`` inside a section
    (``model: {base: ../model/tiny.yaml}``) and the top-level keys named in ``path_keys`` whose value
    is a string (``model: ../model/tiny.yaml``) are made absolute as each file is read.
    """
    path = Path(path).resolve()
    if not path.is_file():
        referrer = f" (the base of {_seen[-1]})" if _seen else ""
        raise ConfigError(f"config file not found: {path}{referrer}")
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    _absolute_references(data, path, path_keys)
    base = data.pop("base", None)
    if base is None:
        return _plain(data)
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path, got {base!r}")
    return _plain(deep_merge(load_yaml(path.parent / base, _seen + (path,), path_keys), data))


def _plain(value: Any) -> Any:
    """``value`` with every ``Replace`` left in it (one its base had no mapping for) a plain dict."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: its problem and where (1-based line and column)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def _absolute_references(data: dict[str, Any], source: Path, path_keys: tuple[str, ...], prefix: str = "") -> None:
    """In place: section-level ``base`` strings and the top-level ``path_keys`` strings -> absolute
    (relative to ``source``'s directory). A file they name that does not exist is a ConfigError naming
    ``source`` and the key (a config copied elsewhere keeps its relative references)."""

    def absolute(reference: str, key: str) -> str:
        target = source.parent / Path(reference).expanduser()
        if not target.is_file():
            raise ConfigError(f"{source}: {key}: config file not found: {target.resolve()}")
        return str(target)

    for key, value in data.items():
        if key in path_keys and isinstance(value, str) and value:
            data[key] = absolute(value, f"{prefix}{key}")
        if isinstance(value, dict):
            nested = value.get("base")
            if isinstance(nested, str) and nested:
                value["base"] = absolute(nested, f"{prefix}{key}.base")
            _absolute_references(value, source, (), f"{prefix}{key}.")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged over ``base``: nested mappings merge, everything else replaces, and so does a
    mapping written ``!replace`` (``Replace``), which is left a plain dict."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and not isinstance(value, Replace) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = dict(value) if isinstance(value, Replace) else value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place.

    ``vision.encoders.0.image_size=224`` indexes into lists. Raises TypeError for a single string
    (a common slip: it would be read one character at a time).
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}: "
                        f"pass [{overrides!r}]")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({_yaml_problem(err)})") from None
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: i + 1]), create=True)
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(node, last, key)
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:-1])} is not a mapping")
    return data


def _index(node: list, part: str, key: str) -> int:
    try:
        idx = int(part)
    except ValueError:
        raise ConfigError(f"override {key!r}: {part!r} indexes a list, use a number") from None
    if not -len(node) <= idx < len(node):
        raise ConfigError(f"override {key!r}: index {idx} out of range (list has {len(node)})")
    return idx


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"override path {path!r} goes through a non-mapping value")
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"unknown key {path!r}")
        node[part] = {}
    return node[part]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field's annotation holds (itself, or inside Optional / list / dict / Union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation) if typing.get_origin(annotation) is not None else ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _known_keys(schema: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows where ``loc`` (the path to an unknown key, without it) points."""
    model = schema
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):  # a list item: the field's element model is already in hand
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _override_for(loc: str, overrides: typing.Sequence[str]) -> str | None:
    """The ``key=value`` override that set ``loc`` (dotted) or a section holding it, if one did."""
    for override in reversed(overrides):  # the last one wins, as apply_overrides applies them
        key = override.split("=", 1)[0].strip()
        if loc == key or loc.startswith(key + "."):
            return override
    return None


def _overrides_inside(loc: str, overrides: typing.Sequence[str]) -> list[str]:
    """The ``key=value`` overrides that set something strictly inside ``loc`` (dotted; "" = the root)."""
    keys = [(override, override.split("=", 1)[0].strip()) for override in overrides]
    return [override for override, key in keys if not loc or key.startswith(loc + ".")]


def _where(loc: str, source: str, overrides: typing.Sequence[str], unknown: bool = False) -> str:
    """Who a problem at ``loc`` (dotted; "" = the root) is blamed on: the command-line override that set
    it or a section holding it; for an unknown key, the override that wrote below it (``projector.type=mlp``
    makes the unknown section ``projector``); for a section whose value the file and overrides made
    together, ``source (with override, ...)``; else ``source``."""
    override = _override_for(loc, overrides) if loc else None
    inside = _overrides_inside(loc, overrides)
    if override is None and unknown and inside:
        override = inside[-1]
    if override is not None:
        return f"command-line override {override!r}"
    if inside and not unknown:
        return f"{source} (with {', '.join(inside)})"
    return source


def _wrapping(annotation: Any) -> type | None:
    """``list`` or ``dict`` when the annotation holds its model inside one (``list[EncoderConfig]``), else None."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, dict) and _model_in(annotation) is not None:
        return dict if origin is dict else list
    for arg in typing.get_args(annotation) if origin is not None else ():
        found = _wrapping(arg)
        if found is not None:
            return found
    return None


def _free_mapping(annotation: Any) -> bool:
    """Whether the annotation takes any keys below it (``dict[str, Any]``, ``Any``)."""
    if annotation is Any or typing.get_origin(annotation) is dict:
        return True
    return any(_free_mapping(arg) for arg in typing.get_args(annotation)) if typing.get_origin(annotation) else False


def _path_exists(schema: type[BaseModel], parts: typing.Sequence[str]) -> bool:
    """Whether the dotted path ``parts`` names a key of ``schema`` (list items by index, anything below
    a free mapping such as ``llm.config``)."""
    model: type[BaseModel] = schema
    i = 0
    while i < len(parts):
        field = model.model_fields.get(parts[i])
        if field is None:
            return False
        i += 1
        inner = _model_in(field.annotation)
        if inner is None:
            return i == len(parts) or _free_mapping(field.annotation)
        wrapper = _wrapping(field.annotation)
        if wrapper is not None and i < len(parts):  # the next part picks an item
            if wrapper is list and not re.fullmatch(r"-?\d+", parts[i]):
                return False
            i += 1
        model = inner
    return True


def _sections(schema: type[BaseModel], prefix: tuple[str, ...] = ()) -> typing.Iterator[tuple[str, ...]]:
    """The dotted paths of ``schema``'s nested sections (not through lists or mappings), itself first."""
    yield prefix
    if len(prefix) >= 8:
        return
    for name, field in schema.model_fields.items():
        inner = _model_in(field.annotation)
        if inner is not None and _wrapping(field.annotation) is None:
            yield from _sections(inner, prefix + (name,))


def _relocated(schema: type[BaseModel] | None, parts: tuple[str, ...], children: tuple[str, ...] = ()) -> list[str]:
    """Where an unknown dotted path exists in ``schema`` with a section prefix added
    (``projector.type`` -> ``model.projector.type`` in a train config) or leading parts dropped
    (``model.projector.type`` -> ``projector.type`` in a model config), taking the keys ``children``
    its value holds: the closest few."""
    if schema is None or not parts:
        return []

    def fits(path: tuple[str, ...]) -> bool:
        return _path_exists(schema, path) and all(_path_exists(schema, path + (child,)) for child in children)

    found = {prefix + parts for prefix in _sections(schema) if prefix} | {parts[drop:] for drop in range(1, len(parts))}
    return sorted((".".join(path) for path in found if fits(path)), key=lambda path: (path.count("."), path))[:3]


def _unknown_key_hint(
    schema: type[BaseModel] | None, loc: tuple[Any, ...], value: Any, override: str | None
) -> str:
    """`` (did you mean ...?)`` for an unknown key at ``loc`` holding ``value``: where its whole path (the
    override's key when an override wrote below it) exists under another section, else the closest
    spelling there."""
    parts = tuple(str(p) for p in loc)
    children = tuple(str(k) for k in value) if isinstance(value, dict) else ()
    if override is not None:
        key = tuple(override.split("=", 1)[0].strip().split("."))
        if key[: len(parts)] == parts and len(key) > len(parts):
            parts, children = key, ()
    elsewhere = _relocated(schema, parts, children)
    if elsewhere:
        return f" (did you mean {' or '.join(repr(path) for path in elsewhere)}?)"
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(schema, tuple(loc[:-1])), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_validation_error(
    err: ValidationError, source: str, schema: type[BaseModel] | None = None, overrides: typing.Sequence[str] = ()
) -> str:
    """One line per problem: ``source: dotted.key: message (got value)``, the value shown for a wrong
    value (not for an unknown or missing key); a string "None" gets a hint that YAML's null is ``null``;
    an unknown key a ``did you mean``: the same path under another section of ``schema`` (a train
    config's ``model.`` prefix missing, a model config's written) or the closest allowed key there.

    A problem that a command-line override made names that override instead of ``source``
    (``command-line override 'projector.type=mlp': projector: unknown key``); a problem with a section
    that overrides changed inside names both (``source (with llm.family=mamba2): llm: ...``).

    A top-level section that only a train config has (``model``, ``train``, ``data``) under another
    schema adds a line saying so."""
    lines = []
    for e in err.errors():
        dotted = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")  # a validator's own message, as it wrote it
        unknown = e["type"] == "extra_forbidden"
        where = _where(dotted, source, overrides, unknown=unknown)
        if unknown:
            writer = _override_for(dotted, overrides) or next(reversed(_overrides_inside(dotted, overrides)), None)
            msg = "unknown key" + _unknown_key_hint(schema, tuple(e["loc"]), e.get("input"), writer)
        elif e["type"] != "missing" and "input" in e and not isinstance(e["input"], dict | list):
            msg += f" (got {e['input']!r}"
            msg += "; YAML's null is written null)" if e["input"] in ("None", "none") else ")"
        lines.append(f"{where}: {dotted or '<root>'}: {msg}")
    sections = {e["loc"][0] for e in err.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 1}
    if {"model", "train"} <= sections:
        lines.append(f"{source}: this looks like a train config (model: + train:); pass its model section or "
                     "a model config, or load it with load_train_config / train/finetune.py")
    return "\n".join(lines)


def _sections_of(value: Any, kinds: tuple[type, ...], loc: tuple[str, ...] = ()) -> typing.Iterator[tuple[str, Any]]:
    """(dotted location, section) of every section of a validated config that is one of ``kinds``."""
    if isinstance(value, kinds):
        yield ".".join(loc), value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _sections_of(getattr(value, name), kinds, loc + (name,))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _sections_of(item, kinds, loc + (str(i),))


SectionChecks = typing.Mapping[type, typing.Callable[[Any], "str | None"]]
"""Checks a schema cannot make itself, by section type: each returns why a section is refused (one line)
or None. ``mambavlm.llm.factory.LLM_SECTION_CHECKS`` is one: whether transformers can make the config of
an ``LLMConfig``; the loaders above the LLM layer pass it, so this module imports nothing above it."""


def exception_line(err: BaseException) -> str:
    """An exception's message as one line, whitespace collapsed. A wrapper that only repeats its cause's
    message gives way to the cause (transformers' config classes wrap a validator's ValueError in a
    multi-line huggingface_hub error: ``Class validation error for validator ...: ValueError: ...``)."""
    while err.__cause__ is not None and str(err.__cause__) and str(err.__cause__) in str(err):
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__


def validate(
    schema: type[M], data: dict[str, Any], source: str = "config", overrides: typing.Sequence[str] = (),
    section_checks: SectionChecks | None = None,
) -> M:
    """Validate a dict against a schema, raising ConfigError with every bad key named (and the override
    that set it, among ``overrides``).

    ``section_checks`` (``SectionChecks``) run on every section of their type once the schema accepts
    the data; a refusal is a ConfigError naming the section and the check's message (an LLM section
    that transformers cannot make a config of, ``llm.family=mamba2`` over a Mamba ``llm.config``, is
    one line here rather than a traceback when the model is built)."""
    try:
        config = schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, schema, overrides)) from None
    checks = dict(section_checks or {})
    problems = [
        f"{_where(loc, source, overrides)}: {loc or '<root>'}: {problem}"
        for loc, section in _sections_of(config, tuple(checks))
        for kind, check in checks.items()
        if isinstance(section, kind) and (problem := check(section)) is not None
    ] if checks else []
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def load_config(
    schema: type[M], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
    section_checks: SectionChecks | None = None,
) -> M:
    """Load YAML ``path`` (if given), apply ``key=value`` overrides, validate against ``schema`` (and
    ``section_checks``, as ``validate``)."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return validate(schema, data, source=str(path) if path is not None else "config", overrides=overrides,
                    section_checks=section_checks)
