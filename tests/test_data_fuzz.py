"""Random files, records and arguments: the data loaders may only ever raise DataError."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedlora.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    load_clients,
    load_mmlu,
    load_records,
    tokenize_record,
)
from fedlora.data.mmlu import LETTERS

from support import byte_tokenizer, write

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
#: mostly strings, sometimes anything, so the checks past the type test are reached too
field_values = st.text(max_size=30) | json_values
record_fields = ["instruction", "input", "output", "context", "response", "category", "class"]
records = st.dictionaries(st.sampled_from(record_fields), field_values, max_size=6)
#: well-formed Dolly records, so that splits are reached and not only the input checks
dolly_records = st.fixed_dictionaries(
    {"instruction": st.text(max_size=5), "response": st.text(max_size=5),
     "category": st.sampled_from(["a", "b", "c"])})
mmlu_texts = st.builds(
    lambda question, options, sep: f"Qusetion: {question} Options: " + sep.join(
        f"{letter}. {option}" for letter, option in zip(LETTERS, options)),
    st.text(max_size=15), st.lists(st.text(max_size=8), min_size=3, max_size=5),
    st.sampled_from([", ", ",", " ", ", , "]))
mmlu_records = st.fixed_dictionaries(
    {"input": mmlu_texts | field_values,
     "output": st.builds("The answer is: {}. {}".format, st.sampled_from("ABCDE"),
                         st.text(max_size=8)) | field_values,
     "class": field_values})


def as_jsonl(rows: list) -> str:
    return "\n".join(map(json.dumps, rows))


file_contents = (st.binary(max_size=200)
                 | json_values.map(json.dumps)
                 | st.lists(records | json_values, max_size=8).map(json.dumps)
                 | st.lists(records, max_size=8).map(as_jsonl))


def raises_only_data_error(load: Callable[[Path], object], name: str, content: str | bytes):
    """Write ``content`` to a fresh file ``name`` and call ``load`` on it."""
    with tempfile.TemporaryDirectory() as directory:
        try:
            load(write(Path(directory) / name, content))
        except DataError:
            pass


@FUZZ
@given(file_contents, st.sampled_from(["train.json", "train.jsonl", "train.txt"]))
def test_load_records_raises_only_data_error(content, name):
    raises_only_data_error(load_records, name, content)


@FUZZ
@given(st.lists(mmlu_records | records | json_values, max_size=6).map(json.dumps)
       | file_contents)
def test_load_mmlu_raises_only_data_error(content):
    raises_only_data_error(load_mmlu, "mmlu.json", content)


@FUZZ
@given(content=st.lists(dolly_records, min_size=5, max_size=40).map(json.dumps)
       | st.lists(dolly_records | records, max_size=20).map(json.dumps) | file_contents,
       num_clients=st.sampled_from([0, 1, 2, 2, 3, 5]),
       partition=st.sampled_from(["iid", "dirichlet", "dirichlet", "x"]),
       alpha=st.sampled_from([1e-3, 0.5, 100.0]) | st.floats(),
       min_size=st.sampled_from([0, 1, 1, 2, 4]), seed=st.integers(0, 2**32 - 1),
       by=st.sampled_from(["category", "category", "input", "nope"]))
def test_load_clients_from_a_file_raises_only_data_error(content, num_clients, partition, alpha,
                                                         min_size, seed, by):
    def split(path: Path):
        clients = load_clients(path, num_clients=num_clients, partition=partition, alpha=alpha,
                               min_size=min_size, seed=seed, by=by)
        assert len(clients) == num_clients
        assert all(len(records) >= min_size for records in clients.values())
        event("split")
    raises_only_data_error(split, "pool.json", content)


@FUZZ
@given(st.dictionaries(st.sampled_from(["local_training_0.json", "local_training_7.json",
                                        "local_training_x.json", "other.json"]),
                       file_contents, max_size=3))
def test_load_clients_from_a_directory_raises_only_data_error(files):
    with tempfile.TemporaryDirectory() as directory:
        for name, content in files.items():
            write(Path(directory) / name, content)
        try:
            load_clients(directory)
        except DataError:
            pass


TOKENIZER = byte_tokenizer()


@FUZZ
@given(st.builds(Record, st.text(max_size=40), st.text(max_size=80), st.text(max_size=40)),
       st.integers(1, 120))
def test_every_tokenized_example_fits_and_learns_at_least_one_token(record, max_length):
    example = tokenize_record(TOKENIZER, record, max_length)
    assert 0 < len(example.input_ids) <= max_length
    learned = [(token, label) for token, label in zip(example.input_ids, example.labels)
               if label != IGNORE_INDEX]
    assert learned and all(token == label for token, label in learned)
    # the learned tokens are the tail: the prompt never follows the response
    assert example.labels[-len(learned):] == [label for _, label in learned]
