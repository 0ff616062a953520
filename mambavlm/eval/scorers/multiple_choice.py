"""Multiple-choice benchmarks scored as their reference scorers score them: MMBench (CircularEval),
SEED-Bench (image dimensions) and MMMU.

References read (each function names the one it reproduces):

* MMBench: VLMEvalKit (open-compass/VLMEvalKit, the evaluation the open-compass/MMBench README points
  to): ``vlmeval/utils/matching_util.py`` (``can_infer``, ``can_infer_option``, ``can_infer_text``),
  ``vlmeval/dataset/utils/multiple_choice.py`` (``mcq_circular_eval``, ``prefetch_circular_group``,
  ``report_acc``) and ``vlmeval/dataset/image_mcq.py`` (``ImageMCQDataset.evaluate``). Answers are
  produced as LLaVA's ``llava/eval/model_vqa_mmbench.py`` writes them (the decoded text, stripped) and
  handed over by ``scripts/convert_mmbench_for_submission.py`` (one prediction per TSV row).
* SEED-Bench: LLaVA's ``scripts/convert_seed_for_submission.py`` (``eval_single``) on answers written by
  ``llava/eval/model_vqa_loader.py``; SEED-Bench's own ``eval.py`` computes the same per-dimension and
  instance-level accuracies.
* MMMU: MMMU-Benchmark/MMMU ``eval/eval_utils.py`` (``parse_multi_choice_response``,
  ``parse_open_response``, ``eval_multi_choice``, ``eval_open``, ``calculate_ins_level_acc``) and
  ``eval/main_eval_only.py`` (per-subject accuracy, instance-level overall, both rounded to 3 places).

Departures common to the three scorers: a question with no prediction counts as wrong and is counted in
``counts["missing"]`` (LLaVA's SEED script does exactly this; the MMBench and MMMU scripts only ever see
complete prediction files); predictions for ids that are not questions are ignored, as the references
ignore them.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mambavlm.eval.scorers.report import ScoreReport

__all__ = [
    "MMBenchQuestion",
    "MMMUQuestion",
    "SEEDQuestion",
    "mmbench_letter",
    "mmmu_eval_open",
    "mmmu_guess",
    "mmmu_letter",
    "mmmu_parse_open_response",
    "score_mmbench",
    "score_mmmu",
    "score_seedbench",
]


# --------------------------------------------------------------------------------------------------
# MMBench
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMBenchQuestion:
    """One row of the MMBench TSV, i.e. one circular pass of a question.

    ``base_index``: ``int(index % 1e6)`` as VLMEvalKit's ``mcq_circular_eval`` computes ``g_index``
    (the official TSV numbers the shifted copies of question ``i`` as ``i + k * 1_000_000``).
    ``answer``: this pass's correct letter. ``options``: letter -> option text for this pass (the
    non-empty ``A``..``D`` columns).
    """

    base_index: int
    answer: str
    options: Mapping[str, str]
    category: str
    l2_category: str


_MMBENCH_API_FAILURE = "Failed to obtain answer via API"
_MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_MMBENCH_SEPARATORS = ".()[],:;!*#{}"
# can_infer_option only trusts a letter among the last few tokens: its index must exceed len - 5.
_MMBENCH_LETTER_WINDOW = 5


def _mmbench_option_letter(text: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_option`` (None where it returns False)."""
    if _MMBENCH_API_FAILURE in text:
        return None
    if any(phrase in text for phrase in _MMBENCH_REFUSALS):
        return "Z"
    spaced = text
    for separator in _MMBENCH_SEPARATORS:
        spaced = spaced.replace(separator, " ")
    tokens = spaced.split()
    present = [letter for letter in options if letter in tokens]
    if len(present) == 1:
        letter = present[0]
        # .index is the letter's FIRST occurrence, even when it is repeated later on.
        return letter if tokens.index(letter) > len(tokens) - _MMBENCH_LETTER_WINDOW else None
    if not present and "Z" in tokens:
        return "Z"
    return None


def _mmbench_text_letter(text: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text`` (None where it returns False)."""
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(option) for option in options.values()):
        return None
    found = [letter for letter, option in options.items() if option.lower() in lowered]
    return found[0] if len(found) == 1 else None


def mmbench_letter(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter VLMEvalKit's rule-based matcher ``can_infer`` reads from an answer, or None
    where it gives up (the official evaluation then asks a ChatGPT judge; we never do).

    Reproduces ``vlmeval/utils/matching_util.py`` in its recent form (the last-five-token window and
    the length guard below, as recent VLMEvalKit copies carry them; they appear to date from PR #1175,
    "Improve can_infer_option and can_infer_text", July 2025), with the ``VERBOSE`` environment
    variable unset (its default; set, it also rejects answers with an "A" token and more than three
    tokens):

    1. ``can_infer_option``: an answer containing "Failed to obtain answer via API" skips to step 2;
       one containing a refusal phrase ("Cannot determine the answer", ...) gives ``"Z"``. Otherwise
       the characters ``.()[],:;!*#{}`` become spaces, the answer is split on whitespace, and the
       option letters found among the tokens are counted. Exactly one -> that letter, provided its
       first occurrence is among the last five tokens (index > number of tokens - 5): "The answer is
       C" -> C, "(B) cat" -> B, "A cat" -> A (the article counts), but "C is correct because the cat
       sits on a mat" -> nothing. None found and a token "Z" -> ``"Z"``. Two or more -> step 2.
    2. ``can_infer_text``: unless the lower-cased answer is longer than twice the options' total
       length, the one option whose lower-cased text occurs in it ("cat" -> the option "cat"); zero
       or several such options -> None.

    Older VLMEvalKit releases (e.g. commit 18fc37a5) accepted the single letter anywhere and had no
    length guard in step 2; one stored commit (134b4ea6) inverts the window test (``<``), which would
    reject a bare "A", so we follow the form the copies agree on (``>``). ``"Z"`` is returned as the reference
    returns it: it never equals a real answer, so such a pass is wrong, not unmatched.
    """
    return _mmbench_option_letter(text, options) or _mmbench_text_letter(text, options)


def score_mmbench(predictions: Mapping[str, str], questions: Mapping[str, MMBenchQuestion]) -> ScoreReport:
    """MMBench CircularEval as VLMEvalKit's ``mcq_circular_eval`` + ``report_acc`` compute it under its
    ``exact_matching`` policy (no judge model).

    ``questions`` maps each TSV row's ``index`` (as a string) to its pass; ``predictions`` maps the
    same ids to the model's answer text, stripped as LLaVA's ``model_vqa_mmbench.py`` strips it. The
    passes sharing a ``base_index`` form one question, scored only when its own row (id ==
    ``base_index``) is among the questions, as the reference scores only groups whose index equals
    their ``g_index``; category and l2-category come from that row. A question is right only if every
    one of its passes gives, through ``mmbench_letter``, exactly that pass's answer.

    Departure: where ``mmbench_letter`` gives up, the official evaluation asks ChatGPT to map the
    answer to an option; we call no API and count the pass as wrong (VLMEvalKit's ``exact_matching``
    mode does the same). This can only lower the score. ``counts["unmatched"]`` counts such passes;
    ``counts["unmatched_questions"]`` the questions whose verdict rested on them (every pass that was
    matched was right and none was missing): the judge could have raised the overall score by at most
    that many questions. ``counts["no_base_row"]`` counts passes whose question's own row is absent.

    overall and breakdowns (``category``, ``l2-category``; group names as in the TSV, not
    VLMEvalKit's display abbreviations) in percent, unrounded as ``report_acc`` leaves them.
    """
    groups: dict[int, list[tuple[str, MMBenchQuestion]]] = defaultdict(list)
    for question_id, question in questions.items():
        groups[question.base_index].append((question_id, question))

    hits: dict[int, bool] = {}
    bases: dict[int, MMBenchQuestion] = {}
    counts = {"questions": 0, "passes": 0, "unmatched": 0, "unmatched_questions": 0, "missing": 0, "no_base_row": 0}
    for base_index, passes in groups.items():
        base = [question for question_id, question in passes if _tsv_index(question_id) == base_index]
        if not base:
            counts["no_base_row"] += len(passes)
            continue
        bases[base_index] = base[0]
        wrong = unmatched = missing = 0
        for question_id, question in passes:
            if question_id not in predictions:
                missing += 1
                continue
            letter = mmbench_letter(predictions[question_id].strip(), question.options)
            if letter is None:
                unmatched += 1
            elif letter != question.answer:
                wrong += 1
        hits[base_index] = wrong == unmatched == missing == 0
        counts["questions"] += 1
        counts["passes"] += len(passes)
        counts["unmatched"] += unmatched
        counts["missing"] += missing
        counts["unmatched_questions"] += int(unmatched > 0 and wrong == missing == 0)
    if not hits:
        raise ValueError("no MMBench question has its own row (id == base_index) among the questions")

    breakdowns: dict[str, dict[str, float]] = {}
    for name, field in (("category", "category"), ("l2-category", "l2_category")):
        by_group: dict[str, list[bool]] = defaultdict(list)
        for base_index, hit in hits.items():
            by_group[getattr(bases[base_index], field)].append(hit)
        breakdowns[name] = {group: 100 * sum(by_group[group]) / len(by_group[group]) for group in sorted(by_group)}
    overall = 100 * sum(hits.values()) / len(hits)
    return ScoreReport("MMBench", overall, breakdowns, counts)


def _tsv_index(question_id: str) -> int:
    """The TSV ``index`` a question id names (VLMEvalKit asserts these are integers)."""
    try:
        return int(question_id)
    except ValueError:
        raise ValueError(f"MMBench question id {question_id!r} is not the TSV's integer index") from None


# --------------------------------------------------------------------------------------------------
# SEED-Bench
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SEEDQuestion:
    """One SEED-Bench question: ``answer`` is its letter (A-D); ``question_type_id`` its evaluation
    dimension and ``question_type`` that dimension's name, as the annotation file's ``question_type``
    map gives it (LLaVA's script reads the names from there); ``data_type`` "image" or "video"."""

    answer: str
    question_type_id: int
    question_type: str
    data_type: str = "image"


def score_seedbench(predictions: Mapping[str, str], questions: Mapping[str, SEEDQuestion]) -> ScoreReport:
    """SEED-Bench image accuracy as LLaVA's ``scripts/convert_seed_for_submission.py`` computes it
    (``eval_single(..., eval_only_type='image')``; per dimension as its all-types pass prints it).

    There is no letter extraction: LLaVA compares the answer text, stripped as ``model_vqa_loader.py``
    strips the decoded output, with the answer letter for exact equality, so "B" is right and "B. A red
    car" or "b" is wrong (LLaVA prompts "Answer with the option's letter from the given choices
    directly."). A question without a prediction counts as wrong, as in LLaVA's script. Only
    ``data_type == "image"`` questions (dimensions 1-9 in SEED-Bench-1) are scored; the others are
    counted in ``counts["skipped_not_image"]``.

    overall: instance-level accuracy over the image questions; breakdowns ``question_type``:
    dimension name -> accuracy, in dimension-id order; percent rounded to 2 places as the script
    prints them (``:.2f``).
    """
    totals: dict[int, int] = defaultdict(int)
    correct: dict[int, int] = defaultdict(int)
    names: dict[int, str] = {}
    counts = {"questions": 0, "missing": 0, "skipped_not_image": 0}
    for question_id, question in questions.items():
        if question.data_type != "image":
            counts["skipped_not_image"] += 1
            continue
        type_id = question.question_type_id
        names[type_id] = question.question_type
        totals[type_id] += 1
        counts["questions"] += 1
        if question_id not in predictions:
            counts["missing"] += 1
        elif predictions[question_id].strip() == question.answer:
            correct[type_id] += 1
    if not totals:
        raise ValueError("no SEED-Bench image question to score")

    per_type = {names[type_id]: round(correct[type_id] / totals[type_id] * 100, 2) for type_id in sorted(totals)}
    overall = round(sum(correct.values()) / sum(totals.values()) * 100, 2)
    return ScoreReport("SEED-Bench-image", overall, {"question_type": per_type}, counts)


# --------------------------------------------------------------------------------------------------
# MMMU
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMMUQuestion:
    """One MMMU question. ``question_type``: "multiple-choice" or "open" (anything else is scored as
    open, as in the reference). ``answer``: the letter (multiple-choice) or the answer text (open); a
    sequence means any of them is accepted. ``options``: the option texts in order (A, B, ...), empty
    for open questions. ``subject``: e.g. "Art_Theory" (the official ids ``validation_Art_Theory_12``
    carry it between the split and the number)."""

    question_type: str
    answer: str | Sequence[str]
    subject: str
    options: Sequence[str] = ()


_MMMU_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'")
# Content matching is tried only on responses of more than this many whitespace-separated tokens.
_MMMU_CONTENT_MIN_TOKENS = 5


def _mmmu_letters(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]


def mmmu_letter(response: str, options: Sequence[str]) -> str | None:
    """The letter MMMU's ``parse_multi_choice_response`` picks, or None where it picks at random.

    Reproduces ``eval/eval_utils.py`` of MMMU-Benchmark/MMMU:

    1. ``,.!?;:'`` are stripped from both ends, one character kind after the other (so ".,A" keeps
       its comma), and the response is padded with one space each side. Inner whitespace is not
       normalised: "B\\n" never matches " B ".
    2. Candidates: every letter written "(X)"; if none, every letter written " X " (so the article in
       "A cat is ..." is option A; lower-case letters never count); if none and the response has more
       than five tokens, every option whose text occurs in it (case-insensitively).
    3. One candidate -> it. Several -> the one whose LAST occurrence ("(X)", " X " or the option text,
       by the rule that found them) starts furthest right; on a tie, the earlier letter. So "The
       answer is (C), not (A)" -> A.
    4. None -> the reference draws ``random.choice`` of the letters (see ``mmmu_guess``).
    """
    text = response
    for character in _MMMU_EDGE_PUNCTUATION:
        text = text.strip(character)
    text = f" {text} "
    letters = _mmmu_letters(len(options))

    # Each rule: letter -> the mark it looks for, and the text it looks in; the first rule that finds
    # any candidate decides.
    rules = [
        ({letter: f"({letter})" for letter in letters}, text),
        ({letter: f" {letter} " for letter in letters}, text),
    ]
    if len(text.split()) > _MMMU_CONTENT_MIN_TOKENS:
        rules.append(({letter: option.lower() for letter, option in zip(letters, options)}, text.lower()))
    for marks, haystack in rules:
        found = [letter for letter, mark in marks.items() if mark in haystack]
        if found:
            # np.argmax over the last-occurrence positions: the first maximum wins.
            positions = [haystack.rfind(marks[letter]) for letter in found]
            return found[positions.index(max(positions))]
    return None


def mmmu_guess(question_id: str, option_count: int) -> str:
    """The letter chosen where ``mmmu_letter`` finds none.

    Departure: the reference calls the module-level ``random.choice`` (seeded 42 once at import), so
    its pick depends on how many guesses came before; we draw from ``random.Random(question_id)`` so
    that each question's guess is reproducible on its own. Either way it is a uniform guess.
    """
    if option_count < 1:
        raise ValueError(f"MMMU question {question_id!r} is multiple-choice but has no options")
    return random.Random(question_id).choice(_mmmu_letters(option_count))


_MMMU_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_MMMU_TRIVIAL_KEYS = frozenset(":,.!?;'")

_MMMU_NUMBER_WITH_COMMAS = re.compile(
    r"""-? \b \d{1,3} (?: , \d{3} )+ \b   # 1,234 or -12,345,678""",
    re.VERBOSE,
)
_MMMU_NUMBER_SCIENTIFIC = re.compile(
    r"""-? \d+ (?: \. \d+ )? [eE] [+-]? \d+   # 1e5, 2.5E-3""",
    re.VERBOSE,
)
_MMMU_NUMBER_PLAIN = re.compile(
    r"""-? (?: \d+ \. \d+ | \. \d+ | \d+ \b )   # 3.14, .5, 42
        (?! [eE] [+-]? \d+ )                     # not the mantissa of a scientific number
        (?! [,\d] )                              # not part of a comma-grouped number""",
    re.VERBOSE,
)


def _mmmu_numbers(text: str) -> list[str]:
    """``extract_numbers``: comma-grouped, then scientific, then plain numbers, as found."""
    return (
        _MMMU_NUMBER_WITH_COMMAS.findall(text)
        + _MMMU_NUMBER_SCIENTIFIC.findall(text)
        + _MMMU_NUMBER_PLAIN.findall(text)
    )


def _mmmu_normalize(text: str) -> list[str | float]:
    """``normalize_str``: a number (commas removed, as ``float`` reads it) rounded to 2 places; else
    the lower-cased text, a single character as [" c", "c "] to avoid trivial substring matches."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def _mmmu_key_responses(response: str) -> list[str]:
    """``get_key_subresponses``: the shortest tail after an answer indicator, per line."""
    text = response.strip().strip(".").lower()
    # The reference splits on r"\.\s(?=[A-Z])|\n", but only after lower-casing, so the sentence
    # alternative can never match: lines are the only units.
    lines = text.split("\n")
    keys: list[str] = []
    for number, line in enumerate(lines):
        indicators = _MMMU_KEY_INDICATORS + (("=",) if number == len(lines) - 1 else ())
        shortest = ""
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _MMMU_TRIVIAL_KEYS:
            keys.append(shortest)
    return keys or [text]


def mmmu_parse_open_response(response: str) -> list[str | float]:
    """MMMU's ``parse_open_response``: the candidate answers (strings and numbers) in a response.

    The key parts of the response (``_mmmu_key_responses``: per line, the shortest text after "could
    be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ", or "=" on the last line;
    the whole lower-cased response if no line has one), then every number found in them, each
    normalised (numbers to floats rounded to 2 places, text lower-cased). Duplicates removed; the
    reference returns them in ``set`` order, we keep first-seen order (the verdict does not depend on
    the order).
    """
    keys = _mmmu_key_responses(response)
    found: list[str] = keys + [number for key in keys for number in _mmmu_numbers(key)]
    normalized = [value for item in found for value in _mmmu_normalize(item)]
    return list(dict.fromkeys(normalized))


def mmmu_eval_open(answer: str | Sequence[str], parsed: Sequence[str | float]) -> bool:
    """MMMU's ``eval_open``: right if a parsed number equals a normalised answer number, or a
    normalised answer string occurs inside a parsed string (so the gold "paris" is found in "paris,
    france"; a one-character gold "b" only as " b" or "b ")."""
    golds = [answer] if isinstance(answer, str) else list(answer)
    normalized = [value for gold in golds for value in _mmmu_normalize(gold)]
    for prediction in parsed:
        if isinstance(prediction, str):
            if any(isinstance(gold, str) and gold in prediction for gold in normalized):
                return True
        elif prediction in normalized:
            return True
    return False


def score_mmmu(predictions: Mapping[str, str], questions: Mapping[str, MMMUQuestion]) -> ScoreReport:
    """MMMU accuracy as the official ``main_parse_and_eval.py`` + ``main_eval_only.py`` compute it.

    Multiple-choice: ``mmmu_letter`` (the reference's ``parse_multi_choice_response``), falling back
    to ``mmmu_guess`` where it finds no letter (``counts["random_guess"]``; the departure there is only
    the seeding), right if equal to the answer letter (or to one of them). Open: right if
    ``mmmu_eval_open(answer, mmmu_parse_open_response(response))``.

    overall: instance-level accuracy (``calculate_ins_level_acc``: per-subject accuracy weighted by
    its question count); breakdowns ``subject``: accuracy per subject. Each is rounded to 3 places as a
    fraction, as ``main_eval_only.py`` prints it, and given in percent (so 2/3 -> 66.7).
    """
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    counts = {"questions": 0, "multiple_choice": 0, "open": 0, "random_guess": 0, "missing": 0}
    for question_id, question in questions.items():
        total[question.subject] += 1
        counts["questions"] += 1
        is_choice = question.question_type == "multiple-choice"
        counts["multiple_choice" if is_choice else "open"] += 1
        if question_id not in predictions:
            counts["missing"] += 1
            continue
        response = predictions[question_id]
        if is_choice:
            letter = mmmu_letter(response, question.options)
            if letter is None:
                counts["random_guess"] += 1
                letter = mmmu_guess(question_id, len(question.options))
            golds = [question.answer] if isinstance(question.answer, str) else list(question.answer)
            correct = letter in golds
        else:
            correct = mmmu_eval_open(question.answer, mmmu_parse_open_response(response))
        right[question.subject] += int(correct)
    if not total:
        raise ValueError("no MMMU question to score")

    accuracy = {subject: right[subject] / total[subject] for subject in sorted(total)}
    overall = sum(accuracy[subject] * total[subject] for subject in accuracy) / sum(total.values())
    per_subject = {subject: _mmmu_percent(value) for subject, value in accuracy.items()}
    return ScoreReport("MMMU", _mmmu_percent(overall), {"subject": per_subject}, counts)


def _mmmu_percent(fraction: float) -> float:
    """``round(acc, 3)`` as the reference prints it, in percent (one decimal, float noise removed)."""
    return round(round(fraction, 3) * 100, 1)
