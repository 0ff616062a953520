"""Conversation templates, the tiny tokenizer and conversation tokenisation (labels, image runs)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mambavlm.config import LLMConfig
from mambavlm.data.synthetic import ANSWERS, make_shapes_vqa
from mambavlm.llm.templates import TEMPLATES, get_template
from mambavlm.llm.tokenizer import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    build_tiny_tokenizer,
    build_tokenizer,
    tokenize_conversation,
    tokenize_prompt,
)
from tests.conftest import ROOT

VOCAB_FILE = ROOT / "mambavlm" / "llm" / "tiny_vocab.txt"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TWO_TURNS = [
    {"from": "human", "value": "<image>\nwhat color is the circle ?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many objects are there ?"},
    {"from": "gpt", "value": "two"},
]


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    """Word -> id read straight from the vocabulary file (line number = id)."""
    words = [w for w in VOCAB_FILE.read_text().split("\n") if w]
    return {w: i for i, w in enumerate(words)}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


def test_vicuna_v1_renders_fastchat_format():
    template = get_template("vicuna_v1")
    segments = template.render(TWO_TURNS, eos_token="</s>")
    assert segments == [
        (VICUNA_SYSTEM + " USER: <image>\nwhat color is the circle ? ASSISTANT: ", False),
        ("red</s>", True),
        ("USER: how many objects are there ? ASSISTANT: ", False),
        ("two</s>", True),
    ]
    assert "".join(text for text, _ in segments) == (
        VICUNA_SYSTEM + " USER: <image>\nwhat color is the circle ? ASSISTANT: red</s>"
        "USER: how many objects are there ? ASSISTANT: two</s>"
    )


def test_plain_renders_prismatic_format_with_given_eos():
    template = get_template("plain")
    turns = [
        {"from": "user", "value": "  <image>\nWhat is it?  "},
        {"from": "assistant", "value": "A dog. "},
        {"from": "human", "value": "Where?"},
        {"from": "gpt", "value": "On grass."},
    ]
    segments = template.render(turns, eos_token="<|endoftext|>")
    assert segments == [
        ("In: <image>\nWhat is it?\nOut: ", False),
        ("A dog.<|endoftext|>", True),
        ("In: Where?\nOut: ", False),
        ("On grass.<|endoftext|>", True),
    ]


@pytest.mark.parametrize("name", ["vicuna_v1", "plain"])
def test_prompt_matches_rendered_prefix(name):
    template = get_template(name)
    segments = template.render(TWO_TURNS, eos_token="</s>")
    first = template.prompt("<image>\nwhat color is the circle ?", eos_token="</s>")
    second = template.prompt(
        "how many objects are there ?",
        eos_token="</s>",
        history=[("<image>\nwhat color is the circle ?", "red")],
    )
    assert first == segments[0][0]
    assert second == "".join(text for text, _ in segments[:3])


def test_prompt_literal_strings():
    assert (
        get_template("plain").prompt("hi", "</s>", history=[("q", "a")])
        == "In: q\nOut: a</s>In: hi\nOut: "
    )
    assert get_template("vicuna_v1").prompt("hi", "</s>") == VICUNA_SYSTEM + " USER: hi ASSISTANT: "


@pytest.mark.parametrize(
    "turns, message",
    [
        ([], "empty"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "turn 0"),
        ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "turn 1"),
        (
            [
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "q"},
            ],
            "ends with a human",
        ),
        ([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}], "'bot'"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "must be a string"),
        ([{"value": "q"}, {"from": "gpt", "value": "a"}], "'from' and 'value'"),
    ],
)
def test_malformed_turns_raise(turns, message):
    with pytest.raises(ValueError, match=message):
        get_template("plain").render(turns, eos_token="</s>")


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError, match=r"'chatml'.*\['plain', 'vicuna_v1'\]"):
        get_template("chatml")


def test_tiny_tokenizer_specials_and_vocab(tiny, vocab):
    assert [tiny.pad_token_id, tiny.bos_token_id, tiny.eos_token_id, tiny.unk_token_id] == [
        0,
        1,
        2,
        3,
    ]
    assert [tiny.pad_token, tiny.bos_token, tiny.eos_token, tiny.unk_token] == [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    ]
    assert IMAGE_TOKEN not in tiny.get_vocab()
    assert tiny.get_vocab() == vocab
    assert tiny("what's 12?", add_special_tokens=False)["input_ids"] == [
        vocab["what"],
        vocab["'"],
        vocab["s"],
        vocab["1"],
        vocab["2"],
        vocab["?"],
    ]
    assert tiny("zyzzyva", add_special_tokens=False)["input_ids"] == [3]


def test_tiny_tokenizer_covers_templates_and_synthetic_task(tiny, tmp_path):
    train, val = make_shapes_vqa(tmp_path, num_train=60, num_val=20, seed=3)
    texts = []
    for path in (train, val):
        for record in json.loads(path.read_text()):
            texts += [
                turn["value"].replace(IMAGE_TOKEN, "").strip() for turn in record["conversations"]
            ]
    texts += [answer for answers in ANSWERS.values() for answer in answers]
    for text in texts:
        ids = tiny(text, add_special_tokens=False)["input_ids"]
        assert tiny.unk_token_id not in ids, text
        assert tiny.decode(ids) == text
    for name in ("plain", "vicuna_v1"):
        rendered = "".join(t for t, _ in get_template(name).render(TWO_TURNS, "</s>"))
        ids = tiny(rendered.replace(IMAGE_TOKEN, ""), add_special_tokens=False)["input_ids"]
        assert tiny.unk_token_id not in ids, name


def test_tiny_tokenizer_save_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "In: what color is the circle ?\nOut: red</s>"
    assert (
        loaded(text, add_special_tokens=False)["input_ids"]
        == tiny(text, add_special_tokens=False)["input_ids"]
    )
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_build_tokenizer_builtin_and_errors():
    tok = build_tokenizer(LLMConfig(family="mamba", tokenizer="builtin:tiny"))
    assert tok.get_vocab() == build_tiny_tokenizer().get_vocab()
    with pytest.raises(ValueError, match="llm.tokenizer and llm.source are both unset"):
        build_tokenizer(LLMConfig(family="mamba"))


@pytest.mark.parametrize(
    "specials, pad", [({"unk_token": "u", "eos_token": "e"}, "u"), ({"eos_token": "e"}, "e")]
)
def test_build_tokenizer_pad_fallback(tmp_path, specials, pad):
    backend = Tokenizer(models.WordLevel({"u": 0, "e": 1, "x": 2}, unk_token="u"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(tmp_path)
    tok = build_tokenizer(LLMConfig(family="llama", source=str(tmp_path)))
    assert tok.pad_token == pad
    assert tok.pad_token_id == {"u": 0, "e": 1}[pad]


def test_tokenize_conversation_hand_worked(tiny, vocab):
    segments = get_template("plain").render(TWO_TURNS, eos_token="</s>")
    input_ids, labels = tokenize_conversation(segments, tiny, num_visual_tokens=3, add_bos=True)
    v = vocab
    prompt1 = [
        v["<s>"],
        v["In"],
        v[":"],
        -200,
        -200,
        -200,
        v["what"],
        v["color"],
        v["is"],
        v["the"],
        v["circle"],
        v["?"],
        v["Out"],
        v[":"],
    ]
    answer1 = [v["red"], v["</s>"]]
    prompt2 = [
        v["In"],
        v[":"],
        v["how"],
        v["many"],
        v["objects"],
        v["are"],
        v["there"],
        v["?"],
        v["Out"],
        v[":"],
    ]
    answer2 = [v["two"], v["</s>"]]
    assert input_ids == prompt1 + answer1 + prompt2 + answer2
    assert labels == [-100] * 14 + answer1 + [-100] * 10 + answer2
    assert IMAGE_TOKEN_INDEX == -200

    no_bos_ids, no_bos_labels = tokenize_conversation(
        segments, tiny, num_visual_tokens=3, add_bos=False
    )
    assert no_bos_ids == input_ids[1:] and no_bos_labels == labels[1:]


def test_tokenize_conversation_masks_image_inside_trainable_segment(tiny, vocab):
    ids, labels = tokenize_conversation(
        [("red <image> blue", True)], tiny, num_visual_tokens=2, add_bos=False
    )
    assert ids == [vocab["red"], -200, -200, vocab["blue"]]
    assert labels == [vocab["red"], -100, -100, vocab["blue"]]


def test_tokenize_prompt_is_prefix_of_training_ids(tiny):
    template = get_template("vicuna_v1")
    segments = template.render(TWO_TURNS, eos_token=tiny.eos_token)
    train_ids, _ = tokenize_conversation(segments, tiny, num_visual_tokens=4, add_bos=True)
    prompt = template.prompt(
        "how many objects are there ?", tiny.eos_token, history=[(TWO_TURNS[0]["value"], "red")]
    )
    prompt_ids = tokenize_prompt(prompt, tiny, num_visual_tokens=4, add_bos=True)
    answer_ids = tiny("two</s>", add_special_tokens=False)["input_ids"]
    assert train_ids == prompt_ids + answer_ids
    assert prompt_ids.count(IMAGE_TOKEN_INDEX) == 4
    with pytest.raises(ValueError, match="num_visual_tokens"):
        tokenize_prompt(prompt, tiny, num_visual_tokens=0, add_bos=True)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_renders_what_prompt_and_render_give(name: str) -> None:
    """The Jinja chat template (what ``apply_chat_template`` runs) against the Python template: the
    generation prompt after a history, a whole conversation, an image part, and a system message."""
    template = TEMPLATES[name]
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template.chat_template
    eos = tokenizer.eos_token
    image_turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is it? "}]}
    messages = [image_turn, {"role": "assistant", "content": " a cat "}, {"role": "user", "content": "and now?"}]
    got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got == template.prompt("and now?", eos, history=[("<image>\n what is it? ", " a cat ")])
    whole = messages + [{"role": "assistant", "content": "a dog"}]
    segments = template.render(
        [{"from": "human", "value": "<image>\n what is it? "}, {"from": "gpt", "value": " a cat "},
         {"from": "human", "value": "and now?"}, {"from": "gpt", "value": "a dog"}],
        eos,
    )
    assert tokenizer.apply_chat_template(whole, tokenize=False) == "".join(text for text, _ in segments)
    system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert system == f"Be brief.{template.sep}{template.user_role}hi{template.sep}{template.assistant_role}"
