"""MMLU questions from FLoRA's Alpaca-style file, and the zero-shot prompt that asks them.

Each FLoRA record packs a question into text::

    "input":  "Qusetion: <question> Options: A. <a>, B. <b>, C. <c>, D. <d>"
    "output": "The answer is: C. <c>"
    "class":  "<subject>"

("Qusetion" is the source's spelling; "Question" is accepted too.) The answer's text, when
given, must equal the option its letter names: that catches an option text that itself
contains ", B. " and would otherwise be split in the wrong place without a word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedlora.data.records import DataError, read_json_rows, string_field, type_name

LETTERS = ("A", "B", "C", "D")

_QUESTION_PREFIX = re.compile(r"\s*(?:Qusetion|Question):\s*")
_OPTIONS_MARKER = "Options:"
_OPTION_STARTS = {letter: re.compile(rf",\s*{letter}\.\s*") for letter in LETTERS}
_ANSWER = re.compile(r"\s*The answer is:\s*(?P<letter>[ABCD])(?:\.(?P<text>.*))?", re.DOTALL)


@dataclass(frozen=True)
class MMLUQuestion:
    question: str
    choices: tuple[str, str, str, str]
    #: the correct choice's letter, "A" to "D"
    answer: str
    #: MMLU's subject id, e.g. "medical_genetics"
    subject: str


def load_mmlu(path: str | Path, limit: int | None = None) -> list[MMLUQuestion]:
    """The questions of a FLoRA-format MMLU .json/.jsonl file; the first ``limit`` if given
    (0: none, a run that scores no MMLU)."""
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be at least 0, got {limit}")
    rows = read_json_rows(path)[:limit]
    return [_parse_question(row, path.name, where) for where, row in rows]


def mmlu_prompt(question: MMLUQuestion) -> str:
    """A zero-shot prompt whose next token should be the answer letter."""
    options = "".join(f"{letter}. {choice}\n"
                      for letter, choice in zip(LETTERS, question.choices, strict=True))
    subject = question.subject.replace("_", " ")
    return (f"The following is a multiple choice question about {subject}.\n\n"
            f"{question.question}\n{options}Answer:")


def _parse_question(row: object, source: str, where: str) -> MMLUQuestion:
    if not isinstance(row, dict):
        raise DataError(source, f"must be a JSON object, got {type_name(row)}", where=where)
    text, answer, subject = (string_field(row, name, source, where)
                             for name in ("input", "output", "class"))
    parsed = _split_question(text)
    if parsed is None:
        raise DataError(source, "is not 'Qusetion: … Options: A. …, B. …, C. …, D. …'",
                        where=where, field="input")
    question, choices = parsed
    stated = _ANSWER.fullmatch(answer)
    if stated is None:
        raise DataError(source, "is not 'The answer is: <A-D>. …'", where=where, field="output")
    letter = stated["letter"]
    option = choices[LETTERS.index(letter)]
    stated_text = (stated["text"] or "").strip()
    if stated_text and stated_text != option:
        raise DataError(source, f"says {letter} is {stated_text!r} but option {letter} "
                                f"of 'input' reads {option!r}", where=where, field="output")
    return MMLUQuestion(question, choices, letter, subject)


def _split_question(text: str) -> tuple[str, tuple[str, str, str, str]] | None:
    """(question, choices) from the packed input text; None if it is not in that form.

    A left-to-right scan rather than one regular expression, whose backtracking over four
    free-text groups takes cubic time on text that almost matches.
    """
    prefix = _QUESTION_PREFIX.match(text)
    head, marker, options = text.rpartition(_OPTIONS_MARKER)
    if prefix is None or not marker:
        return None
    options = "," + options  # so that A, like B to D, starts after a comma
    starts, position = [], 0
    for letter in LETTERS:
        start = _OPTION_STARTS[letter].search(options, position)
        if start is None:
            return None
        starts.append(start)
        position = start.end()
    if starts[0].start() != 0:  # text between "Options:" and "A."
        return None
    ends = [start.start() for start in starts[1:]] + [len(options)]
    choices = tuple(options[start.end():end].strip() for start, end in zip(starts, ends))
    return head[prefix.end():].strip(), choices
