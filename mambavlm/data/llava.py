"""LLaVA-format instruction data: records of an optional image and a conversation, as training samples.

A record is ``{"id": ..., "image": "relative/path.jpg" (optional), "conversations": [{"from": "human",
"value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}``. Bad records (missing or
corrupt images, malformed conversations, sequences whose image would be cut by truncation) do not
raise: they come back as :class:`SkippedSample` and the collator drops them.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from mambavlm.llm.templates import ASSISTANT_ROLES, HUMAN_ROLES, ConversationTemplate
from mambavlm.llm.tokenizer import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    tokenize_conversation,
)
from mambavlm.vision.image import image_path_problem, open_image

__all__ = ["SKIP_KINDS", "LlavaDataset", "SkippedSample", "check_records_file", "load_records"]

logger = logging.getLogger(__name__)

IMAGE_LOAD_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class SkippedSample:
    """A record that could not become a sample: its id, why (``reason``, naming the file or limit) and
    the kind of fault (``kind``, one of ``SKIP_KINDS``, what skip counts are kept by)."""

    id: str
    reason: str
    kind: str


SKIP_KINDS = (
    "not a record",
    "malformed conversations",
    "no assistant turn",
    "empty answer",
    "image placeholders",
    "truncation",
    "bad image path",
    "image file not found",
    "unreadable image",
)
"""The kinds of bad record, as counted in ``metrics.json``."""


@dataclass(frozen=True)
class _Skip:
    kind: str
    reason: str


def _json_lines(path: Path) -> bool:
    """Whether ``path`` reads as JSON Lines: its first line alone is a JSON object."""
    try:
        with path.open() as f:
            return isinstance(json.loads(f.readline()), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def load_records(records: Sequence[dict] | str | Path) -> list[dict]:
    """The records themselves, or those of a JSON file holding a list of records. Raises
    FileNotFoundError for a missing file and ValueError naming the file for one that is not JSON (saying
    so for JSON Lines) or not a list; an entry that is not a record (not a mapping) stays, to be skipped and counted by
    ``LlavaDataset`` as ``"not a record"``."""
    if isinstance(records, (str, Path)):
        path = Path(records)
        if not path.is_file():
            raise FileNotFoundError(f"LLaVA data file not found: {path}")
        try:
            with path.open(encoding="utf-8-sig") as f:  # UTF-8 whatever the locale; a byte-order mark dropped
                records = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if _json_lines(path):
                raise ValueError(f"{path}: a JSON Lines file (one object per line), not the JSON list of LLaVA "
                                 "records this takes") from None
            raise ValueError(f"{path}: not a JSON file of LLaVA records ({err})") from None
        source = str(path)
    else:
        source = "records"
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a list of record dicts, got a JSON {type(records).__name__}")
    return records


def check_records_file(path: str | Path) -> None:
    """Raise what ``load_records`` raises for a file that does not open as a JSON list (a missing file,
    JSON Lines, a JSON object, text that is not JSON), reading only its first bytes when it does: a
    check of a large training file before a run builds its model and data, not a parse."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file not found: {path}")
    with path.open("rb") as f:
        start = f.read(4096).lstrip()
    if not start.startswith(b"["):
        load_records(path)  # the precise error (JSON Lines, another JSON value, not JSON); a list parses


class LlavaDataset(Dataset):
    """LLaVA-format records -> ``{"id", "input_ids" (L,), "labels" (L,), "pixel_values", "truncated"}``.

    ``pixel_values`` is a list with one ``(3, H_k, W_k)`` tensor per image transform (one transform per
    vision encoder), or None for a text-only record. A record with an ``"image"`` but no ``<image>``
    in its turns gets ``"<image>\\n"`` prepended to its first human turn (LLaVA's convention); it must
    then hold exactly one ``<image>``, and a text-only record none. Sequences longer than
    ``max_length`` are cut to it (``"truncated": True``) as long as every image token and at least
    one answer token survive; otherwise the record is skipped. So is a record with an empty (or
    all-whitespace) assistant turn, or an ``<image>`` in an assistant turn.
    """

    def __init__(
        self,
        records: Sequence[dict] | str | Path,
        image_root: str | Path | None,
        tokenizer: PreTrainedTokenizerBase,
        template: ConversationTemplate,
        image_transforms: Sequence[Callable[[Image.Image], Tensor]],
        num_visual_tokens: int,
        max_length: int,
        add_bos: bool,
    ) -> None:
        if num_visual_tokens < 1:
            raise ValueError(f"num_visual_tokens must be >= 1, got {num_visual_tokens}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if not image_transforms:
            raise ValueError("image_transforms is empty: give one transform per vision encoder")
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos token to end assistant turns with")
        self.records = load_records(records)
        self.image_root = Path(image_root) if image_root is not None else None
        self.tokenizer = tokenizer
        self.template = template
        self.image_transforms = list(image_transforms)
        self.num_visual_tokens = num_visual_tokens
        self.max_length = max_length
        self.add_bos = add_bos

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self.records[index]
        if not isinstance(record, dict):
            reason = f"entry {index} is a {type(record).__name__}, not a record (a mapping with 'conversations')"
            logger.warning("skipping record %s: %s", index, reason)
            return SkippedSample(str(index), reason, "not a record")
        record_id = str(record.get("id", index))
        result = self._build(record)
        if isinstance(result, _Skip):
            logger.warning("skipping record %s: %s", record_id, result.reason)
            return SkippedSample(record_id, result.reason, result.kind)
        return {"id": record_id, **result}

    def _build(self, record: dict) -> dict[str, Any] | _Skip:
        """The sample's fields, or why it must be skipped."""
        turns = record.get("conversations")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            return _Skip("malformed conversations", "malformed conversations: 'conversations' must be a list of turn dicts")
        if problem := _turn_problem(turns):
            return _Skip("malformed conversations", f"malformed conversations: {problem}")
        if not any(t.get("from") in ASSISTANT_ROLES for t in turns):
            return _Skip("no assistant turn", "no assistant turn")
        for index, turn in enumerate(turns):
            if turn.get("from") not in ASSISTANT_ROLES or not isinstance(turn.get("value"), str):
                continue
            if not turn["value"].strip():
                return _Skip("empty answer", f"assistant turn {index} is empty: nothing to train on but EOS")
            if IMAGE_TOKEN in turn["value"]:
                return _Skip("image placeholders", f"assistant turn {index} holds {IMAGE_TOKEN}; images belong to human turns")
        has_image = "image" in record
        turns = _with_image_placeholder(turns) if has_image else turns
        num_placeholders = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in turns)
        if num_placeholders != int(has_image):
            kind = "an image record" if has_image else "a text-only record"
            return _Skip(
                "image placeholders", f"{kind} holds {num_placeholders} {IMAGE_TOKEN} placeholders, expected {int(has_image)}"
            )
        try:
            segments = self.template.render(turns, self.tokenizer.eos_token)
        except ValueError as err:
            return _Skip("malformed conversations", f"malformed conversations: {err}")

        input_ids, labels = tokenize_conversation(
            segments, self.tokenizer, self.num_visual_tokens, self.add_bos
        )
        truncated = len(input_ids) > self.max_length
        if truncated:
            if IMAGE_TOKEN_INDEX in input_ids[self.max_length :]:
                return _Skip("truncation", f"truncation to max_length={self.max_length} would cut into the image tokens")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                return _Skip("truncation", f"truncation to max_length={self.max_length} leaves no answer tokens")

        pixel_values = None
        if has_image:
            image = self._load_image(record["image"])
            if isinstance(image, _Skip):
                return image
            pixel_values = [transform(image) for transform in self.image_transforms]
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "truncated": truncated,
        }

    def _load_image(self, relative_path: Any) -> Image.Image | _Skip:
        """The record's image, decoded by ``open_image`` (upright, as a viewer shows it), or why it
        cannot be read."""
        if not isinstance(relative_path, str) or not relative_path:
            return _Skip("bad image path", f"'image' must be a non-empty path string, got {relative_path!r}")
        path = (
            self.image_root / relative_path if self.image_root is not None else Path(relative_path)
        )
        if problem := image_path_problem(path):
            return _Skip("bad image path" if path.is_dir() else "image file not found", problem)
        try:
            return open_image(path)
        except IMAGE_LOAD_ERRORS as err:
            return _Skip("unreadable image", f"unreadable image {path}: {type(err).__name__}: {err}")


KNOWN_ROLES = HUMAN_ROLES | ASSISTANT_ROLES
"""The values a turn's ``"from"`` may take."""


def _turn_problem(turns: list[dict]) -> str | None:
    """What is wrong with the first turn whose role is not a known one or whose value is not a string,
    or None. Checked before anything else reads the turns: a turn without its ``"value"`` had been
    reported as a missing ``<image>`` placeholder, and roles the templates do not know (``"USER"``,
    ``"bot"``) as a record without an assistant turn."""
    for index, turn in enumerate(turns):
        role = turn.get("from")
        if not isinstance(role, str) or role not in KNOWN_ROLES:
            shown = "no 'from'" if "from" not in turn else f"role {role!r}"
            return f"turn {index} has {shown}; expected one of {', '.join(sorted(KNOWN_ROLES))}"
        if "value" not in turn:
            return f"turn {index} has no 'value'"
        if not isinstance(turn["value"], str):
            return f"turn {index}: 'value' must be a string, got {type(turn['value']).__name__}"
    return None


def _with_image_placeholder(turns: list[dict]) -> list[dict]:
    """A copy of ``turns`` with ``"<image>\\n"`` before the first human message, unless one has it."""
    if any(IMAGE_TOKEN in str(t.get("value", "")) for t in turns):
        return turns
    turns = copy.deepcopy(turns)
    for turn in turns:
        if turn.get("from") in HUMAN_ROLES and isinstance(turn.get("value"), str):
            turn["value"] = f"{IMAGE_TOKEN}\n{turn['value']}"
            break
    return turns
