"""Training records: instruction records (Alpaca, Dolly) and conversations (``messages`` lists
as Hugging Face/TRL write them, ShareGPT ``conversations``), from a file or the Hugging Face Hub.

An instruction row becomes a :class:`Record`, a conversation row a :class:`Conversation` (a row
with ``messages`` or ``conversations`` is a conversation, whatever else it holds; docs/data.md
lists the formats). Anything wrong with the data raises
:class:`DataError`, whose message names the file, the record (``record 17`` is the 0-based
index in a ``.json`` list, ``line 18`` the 1-based line of a ``.jsonl`` file, ``row 17`` the
index in a Hub dataset) and the field at fault.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.errors import FedloraError

log = logging.getLogger(__name__)

#: file suffixes load_records reads: a JSON list of objects, or one object per line
JSON_SUFFIXES = (".json", ".jsonl")

#: Record field -> its name in Alpaca files, then in Dolly files
_FIELD_ALIASES = {
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "output": ("output", "response"),
}
#: a conversation field -> the keys of its turns' role and text, and role names -> chat roles
_CONVERSATION_FORMS = {
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "conversations": ("from", "value", {"system": "system", "human": "user", "user": "user",
                                        "gpt": "assistant", "assistant": "assistant"}),
}


class DataError(FedloraError):
    """Data that cannot be used; the message names the file, record and field at fault."""

    def __init__(self, source: str, message: str, *, where: str | None = None,
                 field: str | None = None):
        place = ": ".join(part for part in (source, where) if part)
        problem = f"field {field!r} {message}" if field else message
        super().__init__(f"{place}: {problem}")
        self.source = source
        self.where = where
        self.field = field


@dataclass(frozen=True, slots=True)
class Record:
    """One instruction-tuning example; ``input`` is ``""`` when the task has no context."""

    instruction: str
    input: str
    output: str
    category: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation; ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """A multi-turn example: it opens with a system or user turn and has an assistant turn."""

    messages: tuple[Message, ...]


#: what a data row becomes
AnyRecord = Record | Conversation


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_records_with_report` read: the records and how many it skipped."""

    #: the file name or Hub id, as DataError messages name it
    source: str
    records: list[AnyRecord]
    #: records with both an empty instruction and an empty output, left out
    skipped: int
    #: with a ``label_field``: each record's value of it as a string (None where it has none)
    labels: list[str | None] = field(default_factory=list)
    #: with a ``label_field``: where the records without it are (``record 4``), in order
    unlabelled: list[str] = field(default_factory=list)


def load_records(source: str | Path) -> list[AnyRecord]:
    """Load the records of a .json/.jsonl file, or of a Hub dataset id if no such path exists."""
    return load_records_with_report(source).records


def load_records_with_report(source: str | Path, label_field: str | None = None) -> LoadReport:
    """Like :func:`load_records`, also saying how many empty records were skipped; with
    ``label_field``, also every record's value of that top-level field (to split clients by)."""
    label, rows = _read_rows(source)
    records, labels, unlabelled = [], [], []
    for where, row in rows:
        record = record_from_row(row, label, where)
        if record is None:
            continue
        records.append(record)
        if label_field is not None:
            labels.append(_label(row, label_field, label, where))
            if labels[-1] is None:
                unlabelled.append(where)
    skipped = len(rows) - len(records)
    if not records:
        raise DataError(label, f"no usable records ({skipped} empty ones skipped)")
    if skipped:
        log.info("%s: skipped %d records with an empty instruction and output", label, skipped)
    return LoadReport(label, records, skipped, labels, unlabelled)


def record_from_row(row: object, source: str, where: str) -> AnyRecord | None:
    """Normalise one object: a conversation, or an Alpaca or Dolly record (None when its
    instruction and output are empty)."""
    if not isinstance(row, Mapping):
        raise DataError(source, f"must be a JSON object, got {type_name(row)}", where=where)
    forms = [name for name in _CONVERSATION_FORMS if name in row]
    if len(forms) > 1:
        raise DataError(source, f"and {forms[1]!r} are both present; keep one", where=where, field=forms[0])
    if forms:
        return _conversation(row[forms[0]], forms[0], source, where)
    fields = {name: _aliased_string(row, name, source, where) for name in _FIELD_ALIASES}
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        raise DataError(source, f"must be a string or null, got {type_name(category)}",
                        where=where, field="category")
    if not fields["instruction"].strip() and not fields["output"].strip():
        return None
    return Record(**fields, category=category)


def _conversation(turns: object, name: str, source: str, where: str) -> Conversation:
    """The turns of conversation field ``name`` as chat messages."""
    role_key, content_key, roles = _CONVERSATION_FORMS[name]
    if not isinstance(turns, list):
        raise DataError(source, f"must be a list of turns, got {type_name(turns)}", where=where, field=name)
    if not turns:
        raise DataError(source, "is an empty conversation", where=where, field=name)
    messages = []
    for index, turn in enumerate(turns):
        place = f"{name}[{index}]"
        if not isinstance(turn, Mapping):
            raise DataError(source, f"must be an object, got {type_name(turn)}", where=where, field=place)
        role = string_field(turn, role_key, source, where, shown_as=f"{place}.{role_key}")
        if role not in roles:
            expected = ", ".join(map(repr, roles))
            raise DataError(source, f"is {role!r}; expected one of {expected}", where=where,
                            field=f"{place}.{role_key}")
        content = string_field(turn, content_key, source, where, shown_as=f"{place}.{content_key}")
        messages.append(Message(roles[role], content))
    if messages[0].role == "assistant":  # the model needs a turn to answer
        raise DataError(source, "is an assistant turn; a conversation opens with a system or user turn",
                        where=where, field=f"{name}[0]")
    if not any(message.role == "assistant" for message in messages):
        raise DataError(source, "has no assistant turn to learn from", where=where, field=name)
    return Conversation(tuple(messages))


def _label(row: Mapping, name: str, source: str, where: str) -> str | None:
    """The row's value of top-level field ``name`` as a label; None when it has none."""
    value = row.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise DataError(source, f"must be a string or an integer to split clients by, got {type_name(value)}",
                        where=where, field=name)
    return None if value is None else str(value)


def _aliased_string(row: Mapping, name: str, source: str, where: str) -> str:
    """The value of Record field ``name`` under whichever of its aliases the row uses."""
    present = [alias for alias in _FIELD_ALIASES[name] if alias in row]
    if len(present) > 1:
        raise DataError(source, f"and {present[1]!r} are both present; keep one",
                        where=where, field=present[0])
    if not present:
        if name == "input":  # the only optional one: tasks without context
            return ""
        aliases = " or ".join(repr(alias) for alias in _FIELD_ALIASES[name])
        raise DataError(source, f"is missing (expected {aliases})", where=where, field=name)
    return string_field(row, present[0], source, where)


def string_field(row: Mapping, name: str, source: str, where: str, *, shown_as: str | None = None) -> str:
    """``row[name]``, which must exist and be a string; errors call it ``shown_as`` (default: ``name``)."""
    if name not in row:
        raise DataError(source, "is missing", where=where, field=shown_as or name)
    value = row[name]
    if not isinstance(value, str):
        raise DataError(source, f"must be a string, got {type_name(value)}",
                        where=where, field=shown_as or name)
    return value


def type_name(value: object) -> str:
    """A value's type as a message shows it (``null`` rather than ``NoneType``)."""
    return "null" if value is None else type(value).__name__


def read_json_rows(path: Path) -> list[tuple[str, object]]:
    """Decode a .json list or a .jsonl file into (where, value) pairs, one per record."""
    source = path.name
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES:
        raise DataError(source, f"unsupported file type {suffix or '(none)'!r} "
                                f"(expected {' or '.join(JSON_SUFFIXES)})")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(source, f"cannot be read: {error.strerror or error}") from error
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise DataError(source, f"is not valid UTF-8 (byte offset {error.start})") from error
    if not text.strip():
        raise DataError(source, "is empty")
    if suffix == ".jsonl":
        # split on "\n" only (not str.splitlines): JSON strings may hold a raw U+2028
        rows = [(f"line {number}", _parse_json(line, source, f"line {number}"))
                for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    else:
        document = _parse_json(text, source, None)
        if not isinstance(document, list):
            raise DataError(source, f"top level must be a JSON list of records, "
                                    f"got {type_name(document)}")
        rows = [(f"record {index}", row) for index, row in enumerate(document)]
    if not rows:
        raise DataError(source, "contains no records")
    return rows


def _parse_json(text: str, source: str, where: str | None) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        position = f"line {error.lineno}, column {error.colno}"
        if where:  # a .jsonl line: the column is what matters
            position = f"column {error.colno}"
        raise DataError(source, f"invalid JSON at {position}: {error.msg}",
                        where=where) from error
    except (ValueError, RecursionError) as error:  # e.g. a 5000-digit number, deep nesting
        raise DataError(source, f"unreadable JSON: {error}", where=where) from error


def _read_rows(source: str | Path) -> tuple[str, list[tuple[str, object]]]:
    """(label, rows) from a local file, or from the Hub when ``source`` is no existing path."""
    path = Path(source)
    if path.is_file():
        return path.name, read_json_rows(path)
    if path.exists():
        raise DataError(path.name, "is not a file (expected a .json or .jsonl file)")
    if isinstance(source, Path) or _looks_like_path(source):
        raise DataError(str(source), "no such file")
    return source, _hub_rows(source)


def _looks_like_path(source: str) -> bool:
    """True for strings that can only be meant as a local path, never a Hub id."""
    return source.lower().endswith(JSON_SUFFIXES) or source.startswith(("/", ".", "~"))


def _hub_rows(dataset_id: str) -> list[tuple[str, object]]:
    import datasets  # imported when used: it takes a second, and local files do not need it

    try:
        dataset = datasets.load_dataset(dataset_id, split="train")
    except Exception as error:  # the Hub raises many types (network, auth, not found, format)
        raise DataError(dataset_id, "is not an existing path and could not be loaded as a "
                                    "Hugging Face dataset id (when offline, give a local .json "
                                    f"or .jsonl path instead): {error}") from error
    return [(f"row {index}", row) for index, row in enumerate(dataset)]
