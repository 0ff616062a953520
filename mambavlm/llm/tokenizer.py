"""Tokenizers and the tokenisation of conversations with image placeholders.

Images enter the token sequence as placeholders: the text carries ``<image>`` and tokenisation
replaces each one with ``num_visual_tokens`` copies of ``IMAGE_TOKEN_INDEX`` (LLaVA's -200 sentinel).
The model later writes the visual tokens into exactly those positions, so sequence lengths are known
before the model runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mambavlm.config import ConfigError, LLMConfig

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "BUILTIN_TOKENIZERS",
    "TINY_TOKENIZER",
    "tokenizer_name_problem",
    "build_tiny_tokenizer",
    "build_tokenizer",
    "tokenize_conversation",
    "tokenize_prompt",
]

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
TINY_TOKENIZER = "builtin:tiny"
BUILTIN_PREFIX = "builtin:"
TINY_VOCAB_FILE = Path(__file__).with_name("tiny_vocab.txt")
TINY_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``tiny_vocab.txt`` (ids = line numbers), built without downloads.

    Text is split on whitespace, then every punctuation character and every digit becomes its own
    token; words missing from the vocabulary map to ``<unk>``. Decoding joins tokens with single
    spaces (the tokenizers library's behaviour when no decoder is set). ``<pad> <s> </s> <unk>`` are
    ids 0-3; no BOS is added automatically (see :func:`tokenize_conversation`).
    """
    words = TINY_VOCAB_FILE.read_text().split("\n")
    words = [w for w in words if w]
    vocab = {word: i for i, word in enumerate(words)}
    if len(vocab) != len(words):
        duplicates = sorted({w for w in words if words.count(w) > 1})
        raise ValueError(f"{TINY_VOCAB_FILE} lists words more than once: {duplicates}")
    expected_specials = list(TINY_SPECIAL_TOKENS.values())
    if words[:4] != expected_specials:
        raise ValueError(f"{TINY_VOCAB_FILE} must start with {expected_specials}, got {words[:4]}")
    backend = Tokenizer(models.WordLevel(vocab, unk_token=TINY_SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **TINY_SPECIAL_TOKENS
    )


BUILTIN_TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerFast]] = {TINY_TOKENIZER: build_tiny_tokenizer}
"""The tokenizers built without files or downloads, by their ``llm.tokenizer`` name."""


def tokenizer_name_problem(tokenizer: str | None, key: str = "llm.tokenizer") -> str | None:
    """Why ``llm.tokenizer`` names no tokenizer, as one line starting with ``key``, or None: a ``builtin:``
    name that is not one of ``BUILTIN_TOKENIZERS`` (the message lists them). Needs no files: a config check."""
    if tokenizer is None or not tokenizer.startswith(BUILTIN_PREFIX) or tokenizer in BUILTIN_TOKENIZERS:
        return None
    return f"{key} {tokenizer!r} is not a builtin tokenizer; known: {sorted(BUILTIN_TOKENIZERS)}"


def _looks_local(name: str) -> bool:
    """Whether a tokenizer name is meant as a local path (absolute, ./, ../ or ~), as ``llm.source``."""
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or Path(name).expanduser().exists()


def build_tokenizer(cfg: LLMConfig) -> PreTrainedTokenizerBase:
    """The tokenizer an LLM config names, with a pad token (falling back to unk, then eos).

    A ``builtin:`` name builds one of ``BUILTIN_TOKENIZERS`` (``"builtin:tiny"``:
    :func:`build_tiny_tokenizer`); otherwise ``cfg.tokenizer`` (or, when None, ``cfg.source``) is loaded
    with ``AutoTokenizer``.

    Raises:
        ConfigError: an unknown ``builtin:`` name (listing the known ones), or no tokenizer named.
        FileNotFoundError: a local path (absolute, ``./``, ``../``, ``~`` or existing) that is not a
            directory, naming the key (``llm.tokenizer`` or ``llm.source``) and the path.
        ValueError: a tokenizer with no pad, unk or eos token.
    """
    problem = tokenizer_name_problem(cfg.tokenizer)
    if problem is not None:
        raise ConfigError(problem)
    if cfg.tokenizer in BUILTIN_TOKENIZERS:
        return BUILTIN_TOKENIZERS[cfg.tokenizer]()
    name = cfg.tokenizer or cfg.source
    if name is None:
        raise ConfigError(
            "llm.tokenizer and llm.source are both unset: name a tokenizer "
            f"(hub name, local directory, or one of {sorted(BUILTIN_TOKENIZERS)})"
        )
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        key = "llm.tokenizer" if cfg.tokenizer else "llm.source"
        raise FileNotFoundError(f"{key} {name!r} is not a directory (a local tokenizer is a directory of tokenizer files)")
    if _looks_local(name):
        name = str(Path(name).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise ValueError(f"tokenizer {name!r} has no pad, unk or eos token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def _tokenize_text(
    text: str, tokenizer: PreTrainedTokenizerBase, num_visual_tokens: int
) -> list[int]:
    """Token ids of ``text`` without special tokens; each ``<image>`` -> ``num_visual_tokens`` x -200."""
    ids: list[int] = []
    for i, part in enumerate(text.split(IMAGE_TOKEN)):
        if i > 0:
            ids.extend([IMAGE_TOKEN_INDEX] * num_visual_tokens)
        if part:
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    return ids


def _leading_bos(tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> list[int]:
    return [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []


def _check_num_visual_tokens(num_visual_tokens: int) -> None:
    if num_visual_tokens < 1:
        raise ValueError(f"num_visual_tokens must be >= 1, got {num_visual_tokens}")


def tokenize_conversation(
    segments: Sequence[tuple[str, bool]],
    tokenizer: PreTrainedTokenizerBase,
    num_visual_tokens: int,
    add_bos: bool,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for rendered segments ``[(text, trainable), ...]``.

    Labels copy the ids of trainable segments and are ``IGNORE_INDEX`` (-100) elsewhere, at image
    positions and at the leading BOS (added when ``add_bos`` and the tokenizer has one).

    Each segment is tokenised on its own (as LLaVA and Prismatic do), which keeps the answer tokens
    exactly aligned with their labels and makes the prompt tokens equal to those of
    :func:`tokenize_prompt` on the same text. The cost: at a segment boundary (and around each
    ``<image>``) a subword tokenizer may split differently than it would on the joined text, e.g. a
    SentencePiece tokenizer adds its word-start marker to the first word of every segment.
    """
    _check_num_visual_tokens(num_visual_tokens)
    input_ids = _leading_bos(tokenizer, add_bos)
    labels = [IGNORE_INDEX] * len(input_ids)
    for text, trainable in segments:
        ids = _tokenize_text(text, tokenizer, num_visual_tokens)
        input_ids.extend(ids)
        if trainable:
            labels.extend(IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else i for i in ids)
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
    return input_ids, labels


def tokenize_prompt(
    text: str, tokenizer: PreTrainedTokenizerBase, num_visual_tokens: int, add_bos: bool
) -> list[int]:
    """Token ids of a generation prompt (see :meth:`ConversationTemplate.prompt`), same rules as training."""
    _check_num_visual_tokens(num_visual_tokens)
    return _leading_bos(tokenizer, add_bos) + _tokenize_text(text, tokenizer, num_visual_tokens)
