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
not in the annotations raise ``ValueError`` naming them. LLaVA's ``convert_vqav2_for_submission.py``
and ``convert_vizwiz_for_submission.py`` pass each prediction through ``EvalAIAnswerProcessor`` before
uploading it; to reproduce such a submission, map the predictions through :func:`evalai_process_answer`
before calling :func:`score_vqa`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mambavlm.eval.scorers.report import ScoreReport, reject_unknown_ids

__all__ = ["VQA_BENCHMARKS", "VQAAnnotation", "evalai_process_answer", "score_vqa", "vqa_accuracy"]

VQA_BENCHMARKS: tuple[str, ...] = ("vqav2", "textvqa", "vizwiz")
"""The benchmark names :func:`score_vqa` and :func:`vqa_accuracy` accept."""

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
