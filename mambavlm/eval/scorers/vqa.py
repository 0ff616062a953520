"""VQA soft accuracy for VQAv2, TextVQA and VizWiz, each exactly as its reference evaluator computes it.

The three references share the VQA accuracy (for each of the n human answers, leave it out and score
``min(1, humans among the other n - 1 who gave the prediction / 3)``; a question scores the mean of the
n values) and the same answer normaliser, but they feed it different strings, so the three are not
interchangeable:

``"vqav2"``
    GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, class ``VQAEval`` (master,
    commit c4e6a0e: ASCII contractions, 21-character punctuation list). The prediction is always
    normalised (newlines and tabs to spaces, ``strip``, ``processPunctuation``, ``processDigitArticle``).
    The human answers are *not* lower-cased and never go through ``processDigitArticle`` (no number
    words to digits, no article removal, no contractions); they go through ``processPunctuation``
    only, and only when they are not all identical (``len(set(gtAnswers)) > 1``). So "two" scores 0
    against ten humans who all wrote "two", "yes." scores 0 against ten who all wrote "yes." (but 1
    when a tenth wrote "no"), and a human's "Yes" matches no prediction, since predictions are
    lower-cased. Reported: overall, per answer type and per question type, each the mean of the
    per-question accuracies, ``round(100 * sum / count, 2)`` (``setAccuracy``).
``"textvqa"``
    haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py``, ``EvalAIAnswerProcessor`` and
    ``TextVQAAccuracyEvaluator`` (copied there from facebookresearch/mmf), as
    ``llava/eval/eval_textvqa.py`` runs them. Prediction and all human answers go through the same
    processor, which first lower-cases, deletes every "," and "?", splits "'s" into " 's" and strips
    (``word_tokenize``), then applies the VQA normaliser. Because the commas are gone before
    ``process_punctuation``, its comma-between-digits test never fires: "red,blue" becomes "redblue"
    (VQAv2: "red blue") and "1,000" becomes "1000" (as in VQAv2). Exactly 10 human answers are
    required (the reference asserts it). Reported: overall only, ``100 * (sum / count)`` printed with
    ``{:.2f}`` (the same number as ``round(..., 2)``).
``"vizwiz"``
    The VizWiz-VQA API's ``vqaEval.py`` (Qing Li, from vizwiz.org), class ``VQAEval``. The prediction
    is normalised as in VQAv2, but with that file's contractions table, whose values (and most keys
    that contain an apostrophe) use the typographic apostrophe U+2019: "dont" becomes "don’t", which
    does not match a human's "don't". The human answers are never normalised. Unanswerable questions
    are scored like any other (the humans' answer is "unanswerable"). Reported: overall and per answer
    type ("yes/no", "number", "other", "unanswerable"), ``round(100 * sum / count, 2)``.

Rules all three share (``processPunctuation`` / ``processDigitArticle``): each of the 21 punctuation
characters is deleted when it touches a space anywhere in the text or when the text contains
digit-comma-digit, and is otherwise replaced by a space ("t-shirt" -> "t shirt", "1,000" -> "1000");
a period not followed by a digit is deleted ("3.5" keeps it, "yes." loses it), but at most 32 of them,
because the reference passes ``re.UNICODE`` (= 32) where ``re.sub`` takes its ``count``; then the text
is lower-cased and split on whitespace, the number words "none", "zero", ..., "ten" become digits
("none" -> "0"), the articles "a", "an", "the" are dropped and the contractions table is applied word
by word (its keys "Im", "Ive", "Id've" are capitalised and so never match lower-cased words).

Leave-one-out is by position: the reference compares answer records that differ in ``answer_id``
(VQAv2), ``(index, answer)`` pairs (TextVQA) or indices (VizWiz), so identical answers by different
humans are left out one at a time.

Deliberate departures, both asked for by this package's contract: a question without a prediction is
scored 0 and counted in ``counts["missing"]`` (the VQA and VizWiz tools refuse incomplete results and
LLaVA's TextVQA script scores only the questions it has results for), and predictions for questions
not in the annotations raise ``ValueError`` naming them (as the references refuse them: the VQA API's
``loadRes`` asserts the results hold the annotations' question ids, LLaVA's TextVQA script fails with a
KeyError on an answer it cannot find; ``score_answers`` checks first and names the file). LLaVA's ``convert_vqav2_for_submission.py``
and ``convert_vizwiz_for_submission.py`` pass each prediction through ``EvalAIAnswerProcessor`` before
uploading it; to reproduce such a submission, map the predictions through :func:`evalai_process_answer`
before calling :func:`score_vqa`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mambavlm.eval.scorers.files import field as _field
from mambavlm.eval.scorers.files import load_json as _load_json
from mambavlm.eval.scorers.report import ScoreReport, reject_unknown_ids

__all__ = [
    "TEXTVQA_PROMPT",
    "VIZWIZ_PROMPT",
    "VQAV2_PROMPT",
    "VQA_BENCHMARKS",
    "VQAAnnotation",
    "evalai_process_answer",
    "llava_textvqa_question",
    "read_textvqa_llava_index",
    "read_vqa_annotations",
    "score_vqa",
    "vqa_submission",
    "vqa_accuracy",
]

VQA_BENCHMARKS: tuple[str, ...] = ("vqav2", "textvqa", "vizwiz")
"""The benchmark names :func:`score_vqa` and :func:`vqa_accuracy` accept."""

VQAV2_PROMPT = "Answer the question using a single word or phrase."
"""What LLaVA-1.5 appends, after a newline, to each VQAv2 question (``llava_vqav2_mscoco_test-dev2015.jsonl``:
"What credit card company is on the banner in the background?\\nAnswer the question using a single word or
phrase."; ``docs/Evaluation.md``, "Short-answer")."""

TEXTVQA_PROMPT = "Answer the question using a single word or phrase."
"""The last line of each LLaVA-1.5 TextVQA prompt (``llava_textvqa_val_v051_ocr.jsonl``: the question, then
"Reference OCR token: ..." with the Rosetta OCR tokens, then this line, joined by newlines)."""

VIZWIZ_PROMPT = (
    "When the provided information is insufficient, respond with 'Unanswerable'.\n"
    "Answer the question using a single word or phrase."
)
"""What LLaVA-1.5 appends, after a newline, to each VizWiz question (``llava_test.jsonl`` of its eval.zip:
"What is this?\\nWhen the provided information is insufficient, respond with 'Unanswerable'.\\nAnswer the
question using a single word or phrase.")."""

_PUNCTUATION: tuple[str, ...] = tuple(";/[]\"{}()=+\\_-><@`,?!")
"""The reference's ``punct`` list (identical in all three evaluators); note "." "'" ":" are not in it."""

_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
"""The reference's ``periodStrip`` ``(?!<=\\d)(\\.)(?!\\d)``: its ``(?!<=\\d)`` is a typo for a look-behind
and, being a look-ahead at a ".", never fails, so it matches exactly what this pattern matches."""

_PERIOD_STRIP_COUNT = int(re.UNICODE)
"""32: the reference calls ``periodStrip.sub("", text, re.UNICODE)``, so the flag lands in ``count``."""

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
"""VQAv2 and VizWiz ``commaStrip`` ``(\\d)(\\,)(\\d)``, used only as a test (``re.search``)."""

_DIGIT_COMMAS_DIGIT = re.compile(r"\d,+\d")
"""TextVQA ``COMMA_STRIP`` ``(?<=\\d)(\\,)+(?=\\d)``, used only as a test; it never matches there, since
``word_tokenize`` has already deleted every comma."""

_NUMBER_WORDS: dict[str, str] = {
    word: str(value)
    for value, word in enumerate("zero one two three four five six seven eight nine ten".split())
} | {"none": "0"}
"""The reference's ``manualMap``."""

_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't
couldn'tve couldn't've | couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't
hadnt hadn't | hadnt've hadn't've | hadn'tve hadn't've | hasnt hasn't | havent haven't
hed he'd | hed've he'd've | he'dve he'd've | hes he's | howd how'd | howll how'll | hows how's
Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd | itd've it'd've
it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't | mightnt've mightn't've
mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've | neednt needn't
notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's
shouldve should've | shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've
somebody'd somebodyd | somebodyd've somebody'd've | somebody'dve somebody'd've
somebodyll somebody'll | somebodys somebody's | someoned someone'd | someoned've someone'd've
someone'dve someone'd've | someonell someone'll | someones someone's | somethingd something'd
somethingd've something'd've | something'dve something'd've | somethingll something'll
thats that's | thered there'd | thered've there'd've | there'dve there'd've | therere there're
theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've
weve we've | werent weren't | whatll what'll | whatre what're | whats what's | whatve what've
whens when's | whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've
who'dve who'd've | wholl who'll | whos who's | whove who've | whyll why'll | whyre why're
whys why's | wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've
wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've
y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd | youd've you'd've | you'dve you'd've
youll you'll | youre you're | youve you've
"""
"""The reference's contractions table, ``key value`` pairs (VQAv2 master and TextVQA: identical, ASCII
apostrophes; "somebody'd" -> "somebodyd" runs backwards in the reference too)."""

_CONTRACTIONS: dict[str, str] = dict(
    pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", " | ").split("|") if pair.strip()
)

_VIZWIZ_ASCII_PAIRS = frozenset({"aint", "arent", "cant", "couldve", "couldnt"})
_VIZWIZ_ASCII_KEYS = frozenset({"couldn'tve", "hadn'tve"})
_VIZWIZ_ASCII_VALUES = frozenset({"weve", "wheres", "whove"})


def _vizwiz_contractions() -> dict[str, str]:
    """The VizWiz ``vqaEval.py`` table: the same pairs, but every apostrophe is U+2019 except in the
    first five pairs, the keys "couldn'tve" and "hadn'tve", and the values of "weve", "wheres", "whove"."""
    table = {}
    for key, value in _CONTRACTIONS.items():
        if key not in _VIZWIZ_ASCII_PAIRS:
            value = value if key in _VIZWIZ_ASCII_VALUES else value.replace("'", "\u2019")
            key = key if key in _VIZWIZ_ASCII_KEYS else key.replace("'", "\u2019")
        table[key] = value
    return table


_VIZWIZ_CONTRACTIONS = _vizwiz_contractions()


def _process_punctuation(text: str, digit_comma_digit: re.Pattern[str]) -> str:
    """``processPunctuation`` / ``process_punctuation``: the tests look at the text as it came in."""
    delete_all = digit_comma_digit.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str, contractions: Mapping[str, str]) -> str:
    """``processDigitArticle`` / ``process_digit_article``."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(contractions.get(word, word) for word in words if word not in _ARTICLES)


def _vqa_eval_process_prediction(prediction: str, contractions: Mapping[str, str]) -> str:
    """What ``VQAEval.evaluate`` (VQAv2 and VizWiz) does to the prediction."""
    text = prediction.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text, _DIGIT_COMMA_DIGIT), contractions)


def evalai_process_answer(answer: str) -> str:
    """LLaVA's ``m4c_evaluator.EvalAIAnswerProcessor.__call__`` (from facebookresearch/mmf).

    ``word_tokenize`` (lower-case, delete "," and "?", "'s" -> " 's", strip), newlines and tabs to
    spaces, strip, then the VQA ``process_punctuation`` and ``process_digit_article``. TextVQA applies
    it to the prediction and to every human answer; LLaVA's VQAv2 and VizWiz submission scripts apply
    it to the prediction before upload.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text, _DIGIT_COMMAS_DIGIT), _CONTRACTIONS)


@dataclass(frozen=True)
class VQAAnnotation:
    """One question's human answers (10 for VQAv2, TextVQA and VizWiz; the arithmetic takes any
    number except for TextVQA, whose reference requires 10) and its types. ``answer_type`` ("yes/no",
    "number", "other", and for VizWiz "unanswerable") and ``question_type`` (VQAv2's "what color", ...)
    feed the breakdowns the reference reports for the benchmark; leave them None where the data has none."""

    answers: tuple[str, ...]
    answer_type: str | None = None
    question_type: str | None = None


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in VQA_BENCHMARKS:
        raise ValueError(f"unknown VQA benchmark {benchmark!r}; expected one of {', '.join(VQA_BENCHMARKS)}")


def vqa_accuracy(prediction: str, answers: Sequence[str], benchmark: str = "vqav2") -> float:
    """One question's accuracy in [0, 1], as the ``benchmark``'s reference computes it (module docstring).

    vqav2: ``VQAEval.evaluate``'s per-question ``avgGTAcc``; textvqa: the score
    ``TextVQAAccuracyEvaluator.eval_pred_list`` gives the prediction; vizwiz: the VizWiz
    ``VQAEval.evaluate``'s ``avgGTAcc``.
    """
    _check_benchmark(benchmark)
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    if benchmark == "textvqa":
        if len(answers) != 10:
            raise ValueError(f"TextVQA scores 10 human answers per question, got {len(answers)}")
        humans = [evalai_process_answer(answer) for answer in answers]
        predicted = evalai_process_answer(prediction)
    elif benchmark == "vizwiz":
        humans = list(answers)
        predicted = _vqa_eval_process_prediction(prediction, _VIZWIZ_CONTRACTIONS)
    else:
        humans = list(answers)
        if len(set(humans)) > 1:
            humans = [_process_punctuation(answer, _DIGIT_COMMA_DIGIT) for answer in humans]
        predicted = _vqa_eval_process_prediction(prediction, _CONTRACTIONS)
    per_left_out = []
    for left_out in range(len(humans)):
        agreeing = sum(1 for other, answer in enumerate(humans) if other != left_out and answer == predicted)
        per_left_out.append(min(1.0, agreeing / 3))
    return sum(per_left_out) / len(per_left_out)


def _percent(accuracies: Sequence[float], benchmark: str) -> float:
    """The reference's printed number: ``round(100 * sum / n, 2)`` (VQAEval.setAccuracy); TextVQA
    computes ``sum / n`` first and prints ``100 * that`` with ``{:.2f}``. Both round as Python 3 does: an
    exact binary tie such as 3.125 goes to the even digit, 3.12."""
    if benchmark == "textvqa":
        return round(100.0 * (sum(accuracies) / len(accuracies)), 2)
    return round(100 * sum(accuracies) / len(accuracies), 2)


def _breakdown(
    benchmark: str, labels: Sequence[str | None], accuracies: Sequence[float], field: str
) -> dict[str, float] | None:
    """Per-label percentages, or None when no annotation carries the label; some-but-not-all is an error."""
    present = [label is not None for label in labels]
    if not any(present):
        return None
    if not all(present):
        missing = present.count(False)
        raise ValueError(f"{missing} of {len(labels)} annotations have no {field}; give it for all or none")
    groups: dict[str, list[float]] = {}
    for label, accuracy in zip(labels, accuracies, strict=True):
        groups.setdefault(str(label), []).append(accuracy)
    return {label: _percent(groups[label], benchmark) for label in sorted(groups)}


def score_vqa(
    predictions: Mapping[str, str], annotations: Mapping[str, VQAAnnotation], benchmark: str = "vqav2"
) -> ScoreReport:
    """Score ``predictions`` (question id -> raw model answer) as the ``benchmark``'s reference does.

    vqav2: ``VQAEval.evaluate`` + ``setAccuracy`` (overall, "answer_type", "question_type"); textvqa:
    ``TextVQAAccuracyEvaluator.eval_pred_list`` as ``eval_textvqa.py`` prints it (overall only); vizwiz:
    the VizWiz ``VQAEval.evaluate`` + ``setAccuracy`` (overall, "answer_type"). Questions are averaged in
    the order of ``annotations``. A question with no prediction scores 0 (``counts["missing"]``).
    """
    _check_benchmark(benchmark)
    if not annotations:
        raise ValueError("no annotations to score against")
    reject_unknown_ids(predictions, annotations, "the annotations")
    accuracies = []
    missing = 0
    for question_id, annotation in annotations.items():
        if question_id in predictions:
            accuracies.append(vqa_accuracy(predictions[question_id], annotation.answers, benchmark))
        else:
            missing += 1
            accuracies.append(0.0)
    groups = {"vqav2": ("answer_type", "question_type"), "vizwiz": ("answer_type",), "textvqa": ()}[benchmark]
    breakdowns = {}
    for field in groups:
        labels = [getattr(annotation, field) for annotation in annotations.values()]
        scores = _breakdown(benchmark, labels, accuracies, field)
        if scores is not None:
            breakdowns[field] = scores
    return ScoreReport(
        benchmark=benchmark,
        overall=_percent(accuracies, benchmark),
        breakdowns=breakdowns,
        counts={"questions": len(annotations), "missing": missing},
    )


# ---------------------------------------------------------------- reading the official annotation files

_TEXTVQA_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)
"""``eval_textvqa.prompt_processor``'s pattern for the "OCR tokens: ..." prompt style."""


def _answer_records(record: object, where: str) -> tuple[str, ...]:
    """The ``answer`` strings of ``record["answers"]`` (VQAv2 and VizWiz: a list of answer objects)."""
    answers = _field(record, "answers", list, where)
    if not answers:
        raise ValueError(f"{where}: no human answers")
    return tuple(_field(answer, "answer", str, f"{where}, answers[{i}]") for i, answer in enumerate(answers))


def _read_vqav2(path: Path) -> dict[str, VQAAnnotation]:
    records = _field(_load_json(path, "annotation file"), "annotations", list, str(path))
    annotations: dict[str, VQAAnnotation] = {}
    for index, record in enumerate(records):
        where = f"{path}: annotations[{index}]"
        question_id = str(_field(record, "question_id", int, where))
        where = f"{where} (question_id {question_id})"
        if question_id in annotations:
            raise ValueError(f"{where}: question_id repeated")
        annotations[question_id] = VQAAnnotation(
            answers=_answer_records(record, where),
            answer_type=_field(record, "answer_type", str, where),
            question_type=_field(record, "question_type", str, where),
        )
    return annotations


def _check_vqav2_questions(questions: Path, annotations: Mapping[str, VQAAnnotation], source: Path) -> None:
    """The VQA API's ``loadRes`` / ``VQAEval`` need the question file and the annotations to hold the same ids."""
    records = _field(_load_json(questions, "annotation file"), "questions", list, str(questions))
    asked = {
        str(_field(record, "question_id", int, f"{questions}: questions[{i}]")) for i, record in enumerate(records)
    }
    unasked, unannotated = sorted(set(annotations) - asked), sorted(asked - set(annotations))
    if unasked or unannotated:
        raise ValueError(
            f"{questions} and {source} hold different question ids: {len(unasked)} annotated but not asked "
            f"({', '.join(unasked[:5])}), {len(unannotated)} asked but not annotated ({', '.join(unannotated[:5])})"
        )


def _read_textvqa(path: Path) -> dict[str, VQAAnnotation]:
    records = _field(_load_json(path, "annotation file"), "data", list, str(path))
    annotations: dict[str, VQAAnnotation] = {}
    for index, record in enumerate(records):
        where = f"{path}: data[{index}]"
        question_id = str(_field(record, "question_id", int, where))
        where = f"{where} (question_id {question_id})"
        answers = _field(record, "answers", list, where)
        if len(answers) != 10:
            raise ValueError(f"{where}: TextVQA scores exactly 10 human answers, got {len(answers)}")
        if not all(isinstance(answer, str) for answer in answers):
            raise ValueError(f"{where}: field 'answers' must be a list of strings")
        if question_id in annotations:
            raise ValueError(f"{where}: question_id repeated")
        annotations[question_id] = VQAAnnotation(answers=tuple(answers))
    return annotations


def _read_vizwiz(path: Path) -> dict[str, VQAAnnotation]:
    records = _load_json(path, "annotation file")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of questions (VizWiz val.json), got {type(records).__name__}")
    annotations: dict[str, VQAAnnotation] = {}
    for index, record in enumerate(records):
        where = f"{path}: [{index}]"
        annotations[str(index)] = VQAAnnotation(
            answers=_answer_records(record, where), answer_type=_field(record, "answer_type", str, where)
        )
    return annotations


def read_vqa_annotations(annotations: Path, benchmark: str, questions: Path | None = None) -> dict[str, VQAAnnotation]:
    """Question id (a string) -> :class:`VQAAnnotation`, from a benchmark's official annotation file, for
    :func:`score_vqa`. Questions keep the file's order.

    ``"vqav2"``: ``v2_mscoco_{train,val}2014_annotations.json`` (https://visualqa.org/download.html;
    test-dev answers are not published). Reads ``{"annotations": [{"question_id": int, "question_type": str,
    "answer_type": str, "answers": [{"answer": str, "answer_confidence", "answer_id"}, ...]}, ...]}``, the
    fields GT-Vision-Lab/VQA ``vqaEval.py`` scores with; keyed by ``str(question_id)``, the id LLaVA's
    ``llava_vqav2_mscoco_test-dev2015.jsonl`` uses (e.g. 262144005). ``questions``, the matching
    ``v2_OpenEnded_mscoco_*_questions.json`` (``{"questions": [{"question_id", "image_id", "question"}]}``),
    is optional and only checked to hold the same ids, as the VQA API requires.

    ``"textvqa"``: ``TextVQA_0.5.1_val.json`` (https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_val.json).
    Reads ``{"data": [{"question_id": int, "answers": [10 strings], ...}]}``; exactly 10 answers, as LLaVA's
    ``m4c_evaluator.TextVQAAccuracyEvaluator`` asserts. Keyed by ``str(question_id)`` (e.g. "34602"): LLaVA's
    ``llava_textvqa_val_v051_ocr.jsonl`` cannot supply the key, since its ``question_id`` is the image id,
    shared by the questions on one image; its ``eval_textvqa.py`` finds an answer's annotation by
    ``(image_id, question.lower())`` instead, which :func:`read_textvqa_llava_index` and
    :func:`llava_textvqa_question` reproduce.

    ``"vizwiz"``: the VizWiz-VQA ``val.json`` (``Annotations.zip`` from
    https://vizwiz.cs.colorado.edu/VizWiz_final/vqa_data/Annotations.zip). Reads a list of ``{"image":
    "VizWiz_val_00000000.jpg", "question", "answers": [{"answer": str, "answer_confidence"}, ...],
    "answer_type": str, "answerable"}``, the fields the VizWiz API's ``vqaEval.py`` scores with. VizWiz has no
    question id (its API keys questions by image name); the key is ``str(position in the file)``: LLaVA's
    ``llava_test.jsonl`` numbers the questions of ``test.json`` 0, 1, 2, ... in file order (question 0 is
    ``VizWiz_test_00000000.jpg``) and ``convert_vizwiz_for_submission.py`` maps answers back by that number,
    so a val question file built the same way has ids "0", "1", ... .

    Raises FileNotFoundError naming a missing file, ValueError naming the file and the record (index and,
    where there is one, question id) for a malformed one: not an object, a field missing or of the wrong
    type, no answers (TextVQA: not exactly 10), a repeated question id, or ``questions`` with other ids (or
    given for another benchmark than VQAv2).
    """
    _check_benchmark(benchmark)
    source = Path(annotations)
    if benchmark == "vqav2":
        read = _read_vqav2(source)
        if questions is not None:
            _check_vqav2_questions(Path(questions), read, source)
        return read
    if questions is not None:
        raise ValueError(f"a question file is only cross-checked for vqav2, not {benchmark}")
    return _read_textvqa(source) if benchmark == "textvqa" else _read_vizwiz(source)


def llava_textvqa_question(prompt: str) -> str:
    """The lower-cased question LLaVA's ``eval_textvqa.prompt_processor`` reads back from an answer's
    ``prompt`` (the question file's ``text``), to find its annotation with :func:`read_textvqa_llava_index`.

    "OCR tokens: ..." prompts: what ``Question: (.*?) Short answer:`` captures; prompts of 3 lines holding
    "Reference OCR token: " (LLaVA-1.5's): the first line, or the second when the prompt starts with
    "Reference OCR token:"; prompts of 2 lines: the first. Any other prompt raises ValueError (the reference
    fails an assert there).
    """
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _TEXTVQA_OCR_QUESTION.search(prompt)
        if match is None:
            raise ValueError(f"TextVQA prompt with 'OCR tokens: ' but no 'Question: ... Short answer:': {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"not a TextVQA prompt LLaVA's eval_textvqa.py reads a question from: {prompt!r}")
    return question.lower()


def read_textvqa_llava_index(annotations: Path) -> dict[tuple[str, str], str]:
    """``(image_id, question.lower())`` -> TextVQA question id (a string, the key of
    :func:`read_vqa_annotations`), from ``TextVQA_0.5.1_val.json``: the lookup LLaVA's ``eval_textvqa.py`` does.

    An answer row of a run on LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` (whose ``question_id`` is the image
    id) has the key ``(row["question_id"], llava_textvqa_question(row["prompt"]))``. Where two questions share
    image and lower-cased question, the later one wins, as in the reference's dict. Reads ``{"data":
    [{"question_id": int, "image_id": str, "question": str, ...}]}``; errors as :func:`read_vqa_annotations`.
    """
    path = Path(annotations)
    records = _field(_load_json(path, "annotation file"), "data", list, str(path))
    index: dict[tuple[str, str], str] = {}
    for position, record in enumerate(records):
        where = f"{path}: data[{position}]"
        question_id = str(_field(record, "question_id", int, where))
        where = f"{where} (question_id {question_id})"
        key = (_field(record, "image_id", str, where), _field(record, "question", str, where).lower())
        index[key] = question_id
    return index


def vqa_submission(
    benchmark: str, predictions: Mapping[str, str], questions: Sequence[Mapping[str, Any]],
    where: str = "the questions", subject: str = "answers",
) -> list[dict[str, Any]]:
    """The file the benchmark's evaluation server takes, as LLaVA-1.5's submission scripts write it.

    ``questions``: the lines of the question file the run answered, in order (LLaVA's
    ``llava_vqav2_mscoco_test2015.jsonl`` / VizWiz ``llava_test.jsonl``); ``predictions``: question id ->
    raw answer. Every answer goes through ``evalai_process_answer`` first.
    vqav2 (``scripts/convert_vqav2_for_submission.py``): ``[{"question_id": int, "answer"}]`` over every
    question of the file, "" where the run has no answer (test-dev runs cover part of test2015).
    vizwiz (``scripts/convert_vizwiz_for_submission.py``): ``[{"image", "answer"}]``; every question must
    have an answer (ValueError naming the first missing one, as the script's assert stops there). A question
    line without ``question_id`` (an int for VQAv2) or, for VizWiz, ``image`` is a ValueError naming the line
    (``where``: what holds the questions, e.g. the file). A prediction whose id is no question's is a
    ValueError naming how many and the first five (``subject``: what holds the predictions), before anything
    is written: the answers of another benchmark, split or file would otherwise leave the upload empty
    (LLaVA's scripts pass over them silently).
    """
    if benchmark not in ("vqav2", "vizwiz"):
        raise ValueError(f"submission files are written for vqav2 and vizwiz, not {benchmark!r}")
    rows, asked = [], set()
    for number, line in enumerate(questions, start=1):
        at = f"{where}: line {number}"
        if benchmark == "vqav2":
            question_id = _field(line, "question_id", int, at)
            text = predictions.get(str(question_id))
            rows.append({"question_id": question_id, "answer": "" if text is None else evalai_process_answer(text)})
        else:
            question_id = str(_field(line, "question_id", object, at))
            if question_id not in predictions:
                raise ValueError(f"VizWiz question {question_id} has no answer; the server needs all of them")
            image = _field(line, "image", str, f"{at} (question_id {question_id})")
            rows.append({"image": image, "answer": evalai_process_answer(predictions[question_id])})
        asked.add(str(question_id))
    reject_unknown_ids(predictions, asked, where, subject)
    return rows
