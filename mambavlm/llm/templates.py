"""Conversation templates: how LLaVA-format turns become the text an LLM is trained and prompted on.

Two templates exist:

- ``vicuna_v1`` (FastChat / LLaVA-1.5, for Vicuna):
  ``"{system} USER: {q1} ASSISTANT: {a1}{eos}USER: {q2} ASSISTANT: {a2}{eos}"``
- ``plain`` (Prismatic's ``PurePromptBuilder``, which Cobra uses for base LMs such as Mamba):
  ``"In: {q1}\\nOut: {a1}{eos}In: {q2}\\nOut: {a2}{eos}"``

The end-of-turn string is the tokenizer's eos token (``</s>`` for Vicuna's tokenizer, as in LLaVA).
Messages are stripped of surrounding whitespace; ``<image>`` placeholders stay in the text (the
tokenizer turns them into image-token runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mambavlm.llm.tokenizer import IMAGE_TOKEN

__all__ = ["TEMPLATES", "ConversationTemplate", "get_template"]

HUMAN_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})


@dataclass(frozen=True)
class ConversationTemplate:
    """A turn format: ``[system + sep] (user_role + q + sep + assistant_role + a + eos)*``."""

    name: str
    system: str
    user_role: str
    assistant_role: str
    sep: str

    def render(self, conversations: Sequence[dict], eos_token: str) -> list[tuple[str, bool]]:
        """Render LLaVA turns as text segments with a ``trainable`` flag.

        ``conversations`` alternate ``{"from": "human"|"user", "value": q}`` and
        ``{"from": "gpt"|"assistant", "value": a}``, starting with a human turn and ending with an
        assistant turn. Returns ``[(prompt_1, False), (a_1 + eos, True), (prompt_2, False), ...]``;
        the segments concatenate to the full conversation text, and each prompt segment equals what
        :meth:`prompt` returns for that point of the conversation.
        """
        pairs = _turn_pairs(conversations)
        segments: list[tuple[str, bool]] = []
        prefix = self._prefix()
        for question, answer in pairs:
            segments.append((prefix + self._user_turn(question), False))
            segments.append((answer.strip() + eos_token, True))
            prefix = ""
        return segments

    def prompt(self, message: str, eos_token: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """Text for generation after ``history`` [(question, answer), ...], ending where the answer starts."""
        text = self._prefix()
        for question, answer in history:
            text += self._user_turn(question) + answer.strip() + eos_token
        return text + self._user_turn(message)

    @property
    def chat_template(self) -> str:
        """This format as a transformers chat template (Jinja), for ``tokenizer.apply_chat_template``.

        ``messages`` are ``{"role": "system" | "user" | "assistant", "content": ...}``; a content is a
        string or transformers' list of parts (``{"type": "image"}`` becomes ``<image>`` + newline, as
        a prompt with an image but no placeholder gets; ``{"type": "text", "text": ...}`` its text).
        A system message replaces the template's system prompt. With ``add_generation_prompt=True``
        the text after the last user turn equals :meth:`prompt`'s; without, a conversation's text
        equals the concatenation of :meth:`render`'s segments (``eos_token`` after each answer).
        """
        return (
            "{%- set ns = namespace(system=" + _jinja_string(self.system) + ") -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
            "{%- endif -%}"
            "{%- if ns.system -%}{{ ns.system + " + _jinja_string(self.sep) + " }}{%- endif -%}"
            "{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
            "{%- else -%}{%- set text = namespace(value='') -%}"
            "{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '" + IMAGE_TOKEN + "\n' -%}"
            "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
            "{%- endfor -%}{%- set text = text.value -%}{%- endif -%}"
            "{%- if message['role'] == 'user' -%}"
            "{{ " + _jinja_string(self.user_role) + " + (text | trim) + " + _jinja_string(self.sep) + " }}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{ " + _jinja_string(self.assistant_role) + " + (text | trim) + eos_token }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ " + _jinja_string(self.assistant_role) + " }}{%- endif -%}"
        )

    def _prefix(self) -> str:
        return self.system + self.sep if self.system else ""

    def _user_turn(self, message: str) -> str:
        return self.user_role + message.strip() + self.sep + self.assistant_role


def _jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _turn_pairs(conversations: Sequence[dict]) -> list[tuple[str, str]]:
    """Validate alternating human/assistant turns and pair them as (question, answer)."""
    if not isinstance(conversations, Sequence) or isinstance(conversations, str):
        raise ValueError(
            f"conversations must be a list of turns, got {type(conversations).__name__}"
        )
    if not conversations:
        raise ValueError("conversations is empty")
    values = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {i} must be a dict with 'from' and 'value', got {turn!r}")
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise ValueError(f"turn {i}: 'value' must be a string, got {type(value).__name__}")
        expected = HUMAN_ROLES if i % 2 == 0 else ASSISTANT_ROLES
        if role not in expected:
            want = " or ".join(sorted(expected))
            raise ValueError(
                f"turn {i}: expected a {want} turn (turns alternate, human first), got {role!r}"
            )
        values.append(value)
    if len(values) % 2:
        raise ValueError(
            f"conversation ends with a human turn (turn {len(values) - 1}) without an answer"
        )
    return list(zip(values[0::2], values[1::2]))


TEMPLATES: dict[str, ConversationTemplate] = {
    "vicuna_v1": ConversationTemplate(
        name="vicuna_v1",
        system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        user_role="USER: ",
        assistant_role="ASSISTANT: ",
        sep=" ",
    ),
    "plain": ConversationTemplate(
        name="plain", system="", user_role="In: ", assistant_role="Out: ", sep="\n"
    ),
}


def get_template(name: str) -> ConversationTemplate:
    """The template called ``name``; an unknown name is a ValueError listing the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}"
        ) from None
