"""fedlora.data: records, client splits, Alpaca prompts and tokenisation, MMLU."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from fedlora.data import (
    IGNORE_INDEX,
    DataError,
    LazyTokenizedRecords,
    Record,
    centralize,
    collate,
    format_prompt,
    load_clients,
    load_mmlu,
    load_records,
    load_records_with_report,
    mmlu_prompt,
    tokenize_record,
    tokenize_records,
)

from support import byte_tokenizer, write

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # ../shared/data from the repo; never copied into it
DOLLY = DATA / "dolly-10clients"
MMLU = DATA / "mmlu" / "mmlu_test_1444.json"
real_data = pytest.mark.skipif(not DOLLY.is_dir() or not MMLU.is_file(),
                               reason=f"the shared Dolly/MMLU data is not at {DATA}")

DOLLY_CLIENT_SIZES = {"0": 826, "1": 967, "2": 3840, "4": 2280, "5": 4204, "6": 2129,
                      "7": 3573, "8": 2115, "9": 774}


def dolly(instruction="Say hi", context="", response="hi", category="open_qa") -> dict:
    return {"instruction": instruction, "context": context, "response": response,
            "category": category}


def plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- real data

@real_data
def test_dolly_directory_gives_the_nine_clients_in_numeric_order():
    clients = load_clients(DOLLY)
    assert list(clients) == ["0", "1", "2", "4", "5", "6", "7", "8", "9"]
    assert {client: len(records) for client, records in clients.items()} == DOLLY_CLIENT_SIZES
    assert all(record.category for records in clients.values() for record in records)
    assert len(centralize(clients)) == sum(DOLLY_CLIENT_SIZES.values())


@real_data
def test_dolly_global_test_set_loads_as_records():
    report = load_records_with_report(DOLLY / "global_test.json")
    assert (report.source, len(report.records), report.skipped) == ("global_test.json", 160, 0)
    first = report.records[0]
    assert first.instruction == "What are all the positions in hockey?"
    assert first.input == "" and first.category == "brainstorming"
    assert first.output.startswith("In hockey there are six distinct positions")


@real_data
def test_mmlu_file_gives_1444_questions_over_57_subjects():
    questions = load_mmlu(MMLU)
    assert len(questions) == 1444
    assert len({question.subject for question in questions}) == 57
    assert {question.answer for question in questions} == {"A", "B", "C", "D"}
    assert all(len(question.choices) == 4 and all(question.choices) for question in questions)
    first = questions[0]
    assert first.question == ("Recombinant alpha-iduronidase is used for the treatment of "
                              "which disease/syndrome?")
    assert first.choices == ("Fabry disease", "Gaucher disease", "Hurler syndrome",
                             "Pompe disease")
    assert (first.answer, first.subject) == ("C", "medical_genetics")
    assert load_mmlu(MMLU, limit=10) == questions[:10]


@pytest.fixture(scope="module")
def pooled_dolly(tmp_path_factory) -> Path:
    """Every fifth record of the real Dolly clients, as one file to split."""
    if not DOLLY.is_dir():
        pytest.skip(f"the shared Dolly data is not at {DOLLY}")
    records = centralize(load_clients(DOLLY))[::5]
    path = tmp_path_factory.mktemp("pool") / "dolly_pool.json"
    return write(path, [dolly(r.instruction, r.input, r.output, r.category) for r in records])


def category_share(records: list[Record]) -> dict[str, float]:
    counts = collections.Counter(record.category for record in records)
    return {category: count / len(records) for category, count in counts.items()}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return sum(abs(p.get(key, 0) - q.get(key, 0)) for key in p.keys() | q.keys()) / 2


def test_dirichlet_split_is_seeded_label_skewed_and_respects_min_size(pooled_dolly):
    split = load_clients(pooled_dolly, num_clients=8, alpha=0.3, min_size=50, seed=1)
    assert list(split) == [str(client) for client in range(8)]
    assert load_clients(pooled_dolly, num_clients=8, alpha=0.3, min_size=50, seed=1) == split
    assert load_clients(pooled_dolly, num_clients=8, alpha=0.3, min_size=50, seed=2) != split
    assert min(len(records) for records in split.values()) >= 50
    pooled = load_records(pooled_dolly)
    assert collections.Counter(centralize(split)) == collections.Counter(pooled)
    overall = category_share(pooled)
    # non-IID: the typical client's category mix is far from the pooled one
    distances = sorted(total_variation(category_share(records), overall)
                       for records in split.values())
    assert distances[len(distances) // 2] > 0.2


def test_iid_split_is_balanced_and_mixed(pooled_dolly):
    split = load_clients(pooled_dolly, num_clients=7, partition="iid", seed=3)
    sizes = [len(records) for records in split.values()]
    assert max(sizes) - min(sizes) <= 1
    pooled = load_records(pooled_dolly)
    assert collections.Counter(centralize(split)) == collections.Counter(pooled)
    overall = category_share(pooled)
    assert max(total_variation(category_share(records), overall)
               for records in split.values()) < 0.1
    assert load_clients(pooled_dolly, num_clients=7, partition="iid", seed=4) != split


# --------------------------------------------------------------------------- records

def test_alpaca_and_dolly_fields_normalise_to_the_same_record(tmp_path):
    alpaca = write(tmp_path / "alpaca.json", [{"instruction": "Add", "input": "1 2",
                                               "output": "3"}])
    dolly_file = write(tmp_path / "dolly.json", [dolly("Add", "1 2", "3", None)])
    assert load_records(alpaca) == load_records(dolly_file) == [Record("Add", "1 2", "3")]


def test_jsonl_reads_one_record_per_line_and_ignores_blank_lines(tmp_path):
    path = write(tmp_path / "train.jsonl",
                 json.dumps(dolly("a")) + "\n\n" + json.dumps({"instruction": "b",
                                                               "output": "c"}) + "\n")
    assert [record.instruction for record in load_records(str(path))] == ["a", "b"]


def test_empty_records_are_skipped_and_counted_and_empty_optional_fields_kept(tmp_path):
    path = write(tmp_path / "train.json", [dolly("", "", "", "x"), dolly("q", "", "", "")])
    report = load_records_with_report(path)
    assert report.skipped == 1
    assert report.records == [Record("q", "", "", "")]


BAD_FILES = [  # (file name, content, pieces the message must contain)
    ("local_training_4.json", [dolly()] * 17 + [dolly(response=5)],
     ["local_training_4.json: record 17: field 'response' must be a string, got int"]),
    ("bad.json", '[{"instruction": "a",\n  "output": }]',
     ["bad.json: invalid JSON at line 2, column 13"]),
    ("bad.json", {"instruction": "a", "output": "b"},
     ["bad.json: top level must be a JSON list of records, got dict"]),
    ("bad.json", [dolly(), ["not", "a", "record"]],
     ["bad.json: record 1: must be a JSON object, got list"]),
    ("bad.json", [{"output": "b"}], ["bad.json: record 0: field 'instruction' is missing"]),
    ("bad.json", [{"instruction": "a", "context": ""}],
     ["bad.json: record 0: field 'output' is missing (expected 'output' or 'response')"]),
    ("bad.json", [{"instruction": None, "output": "b"}],
     ["record 0: field 'instruction' must be a string, got null"]),
    ("bad.json", [dolly(context=["x"])], ["record 0: field 'context' must be a string, got list"]),
    ("bad.json", [dolly(category=3)],
     ["record 0: field 'category' must be a string or null, got int"]),
    ("bad.json", [{"instruction": "a", "output": "b", "response": "c"}],
     ["record 0: field 'output' and 'response' are both present"]),
    ("bad.json", b'[{"instruction": "\xff"}]', ["bad.json: is not valid UTF-8 (byte offset 18)"]),
    ("bad.json", "", ["bad.json: is empty"]),
    ("bad.json", " \n", ["bad.json: is empty"]),
    ("bad.json", [], ["bad.json: contains no records"]),
    ("bad.json", [dolly("", response="")], ["bad.json: no usable records (1 empty ones skipped)"]),
    ("bad.json", "[" * 100_000, ["bad.json: unreadable JSON"]),
    ("bad.jsonl", json.dumps(dolly()) + "\n" + json.dumps(dolly(instruction=1)),
     ["bad.jsonl: line 2: field 'instruction' must be a string, got int"]),
    ("bad.jsonl", json.dumps(dolly()) + "\n{oops}\n",
     ["bad.jsonl: line 2: invalid JSON at column 2"]),
    ("bad.jsonl", "\n\n", ["bad.jsonl: is empty"]),
    ("bad.csv", "instruction,output\n", ["bad.csv: unsupported file type '.csv'"]),
]


@pytest.mark.parametrize(("name", "content", "pieces"), BAD_FILES,
                         ids=[pieces[0] for _, _, pieces in BAD_FILES])
def test_each_bad_file_raises_a_data_error_naming_what_is_wrong(tmp_path, name, content, pieces):
    with pytest.raises(DataError) as caught:
        load_records(write(tmp_path / name, content))
    for piece in pieces:
        assert piece in str(caught.value)


def test_a_data_error_carries_its_file_record_and_field(tmp_path):
    path = write(tmp_path / "x.json", [dolly(response=1)])
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert (caught.value.source, caught.value.where, caught.value.field) == \
        ("x.json", "record 0", "response")
    assert isinstance(caught.value, ValueError)


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", pytest.fail)
    for missing in (tmp_path / "nope.json", str(tmp_path / "nope.json"), "./train.jsonl"):
        with pytest.raises(DataError, match="no such file"):
            load_records(missing)
    with pytest.raises(DataError, match="is not a file"):
        load_records(tmp_path)


def test_a_hub_id_that_cannot_be_loaded_asks_for_a_local_path(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as caught:
        load_records("databricks/databricks-dolly-15k")
    message = str(caught.value)
    assert message.startswith("databricks/databricks-dolly-15k: ")
    assert "could not be loaded as a Hugging Face dataset id" in message
    assert "give a local .json or .jsonl path" in message and "no network" in message


def test_a_hub_dataset_is_normalised_like_a_file(monkeypatch):
    rows = [dolly("a", "b", "c", "open_qa"), dolly("d", response=7)]
    requested = {}

    def fake_hub(dataset_id, split):
        requested.update(dataset_id=dataset_id, split=split)
        return datasets.Dataset.from_list(rows[:1])
    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    assert load_records("someone/dolly") == [Record("a", "b", "c", "open_qa")]
    assert requested == {"dataset_id": "someone/dolly", "split": "train"}

    # Arrow cannot hold the bad row's int beside strings, so this fake returns plain rows
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: rows)
    with pytest.raises(DataError, match="someone/dolly: row 1: field 'response' must be a string"):
        load_records("someone/dolly")


# --------------------------------------------------------------------------- partition

def test_client_directory_ids_sort_numerically_and_ignore_other_files(tmp_path):
    for number in (10, 2, 0):
        write(tmp_path / f"local_training_{number}.json", [dolly(str(number))])
    write(tmp_path / "global_test.json", [dolly()])
    clients = load_clients(tmp_path, num_clients=99)  # the files, not num_clients, decide
    assert list(clients) == ["0", "2", "10"]
    assert clients["10"] == [Record("10", "", "hi", "open_qa")]


def test_a_client_file_may_be_jsonl(tmp_path):
    write(tmp_path / "local_training_0.json", [dolly("a")])
    (tmp_path / "local_training_1.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in [{"messages": [{"role": "user", "content": "hi"},
                                                                       {"role": "assistant", "content": "b"}]}]))
    clients = load_clients(tmp_path)
    assert list(clients) == ["0", "1"] and len(clients["1"]) == 1


@pytest.mark.parametrize(("files", "message"), [
    ({}, "has no local_training_<n>.json client files"),
    ({"local_training_a.json": [dolly()]}, "local_training_a.json: client files must be named"),
    ({"local_training_1.json": [dolly()], "local_training_2.json": []},
     "local_training_2.json: contains no records"),
    ({"local_training_1.json": [dolly()], "local_training_1.jsonl": [dolly()]},
     "local_training_1.jsonl: client 1 has a second file, local_training_1.json"),
])
def test_bad_client_directories_raise(tmp_path, files, message):
    for name, content in files.items():
        write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        load_clients(tmp_path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_clients": 0}, "pool.json: num_clients must be at least 1, got 0"),
    ({"min_size": 0}, "min_size must be at least 1, got 0"),
    ({"num_clients": 5, "min_size": 5},
     "20 records cannot give 5 clients at least 5 records each"),
    ({"partition": "shards"}, "unknown partition 'shards' \\(expected 'dirichlet' or 'iid'\\)"),
    ({"alpha": 0.0}, "Dirichlet alpha must be a positive number, got 0.0"),
    ({"alpha": math.nan}, "Dirichlet alpha must be a positive number, got nan"),
    ({"by": "topic"}, "20 of 20 records have no 'topic' \\(the first: record 0\\)"),
    ({"num_clients": 4, "min_size": 5, "alpha": 0.01},
     "gave a client fewer than 5 records: raise alpha or lower min_size"),
])
def test_bad_split_arguments_raise(tmp_path, kwargs, message):
    path = write(tmp_path / "pool.json", [dolly(str(i), category=f"c{i % 4}") for i in range(20)])
    with pytest.raises(DataError, match=message):
        load_clients(path, **{"num_clients": 2, "min_size": 1, **kwargs})


def test_dirichlet_needs_the_partition_field_but_iid_does_not(tmp_path):
    rows = [{"instruction": str(i), "input": "", "output": "o"} for i in range(10)]
    path = write(tmp_path / "alpaca.json", rows)
    with pytest.raises(DataError, match="10 of 10 records have no 'category'.*partition='iid'"):
        load_clients(path, num_clients=2, min_size=1)
    clients = load_clients(path, num_clients=2, min_size=1, partition="iid")
    assert sorted(len(records) for records in clients.values()) == [5, 5]


# --------------------------------------------------------------------------- prompts

def test_prompts_use_the_stanford_alpaca_wording():
    assert format_prompt(Record("Sum", "1 2", "3")) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum\n\n### Input:\n1 2\n\n### Response:\n")
    assert format_prompt(Record("Say {hi}", "", "hi")) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay {hi}\n\n### Response:\n")


@pytest.mark.parametrize("bos", [True, False])
def test_labels_mask_exactly_the_prompt_and_end_with_eos(bos):
    tokenizer = byte_tokenizer(bos=bos)
    record = Record("Translate", "chat", "cät")
    example = tokenize_record(tokenizer, record, max_length=1024)
    prompt = ([1] if bos else []) + plain_ids(tokenizer, format_prompt(record))
    response = plain_ids(tokenizer, "cät") + [tokenizer.eos_token_id]
    assert example.input_ids == prompt + response
    assert example.labels == [IGNORE_INDEX] * len(prompt) + response
    assert not example.truncated


def test_a_long_response_is_cut_after_the_whole_prompt():
    tokenizer = byte_tokenizer()
    record = Record("Write", "", "x" * 500)
    prompt_length = 1 + len(format_prompt(record))
    example = tokenize_record(tokenizer, record, max_length=prompt_length + 20)
    assert len(example.input_ids) == prompt_length + 20 and example.truncated
    assert example.labels[prompt_length:] == plain_ids(tokenizer, "x" * 20)  # no EOS: cut


def test_a_long_prompt_keeps_its_start_the_response_cue_and_a_quarter_for_the_response():
    tokenizer = byte_tokenizer()
    record = Record("Summarise", "word " * 1000, "short answer")
    example = tokenize_record(tokenizer, record, max_length=100)
    text = tokenizer.decode(example.input_ids)
    learned = [label for label in example.labels if label != IGNORE_INDEX]
    assert len(example.input_ids) == 100 and example.truncated
    assert text.startswith("<s>Below is an instruction")
    assert text.endswith("### Response:\nshort answer</s>")
    assert learned == plain_ids(tokenizer, "short answer") + [tokenizer.eos_token_id]

    long_both = Record("Summarise", "word " * 1000, "y" * 1000)
    example = tokenize_record(tokenizer, long_both, max_length=100)
    assert sum(label != IGNORE_INDEX for label in example.labels) == 25
    assert tokenizer.decode(example.input_ids[:75]).endswith("### Response:\n")


def test_tokenize_records_counts_truncations():
    records = [Record("a", "", "b"), Record("a", "", "b" * 300), Record("a", "c" * 300, "b")]
    examples, stats = tokenize_records(byte_tokenizer(), records, max_length=200)
    assert [example.truncated for example in examples] == [False, True, True]
    assert (stats.examples, stats.truncated, stats.prompt_truncated) == (3, 2, 1)


def test_lazy_records_tokenise_on_access_and_count_distinct_truncations():
    records = [Record("a", "", "b"), Record("a", "", "b" * 300), Record("a", "c" * 300, "b")]
    tokenizer = byte_tokenizer()
    lazy = LazyTokenizedRecords(tokenizer, records, max_length=200)
    assert len(lazy) == 3 and lazy.truncated == 0  # len alone tokenises nothing
    assert [lazy[i] for i in (1, 0, 1)] == [tokenize_record(tokenizer, records[i], 200) for i in (1, 0, 1)]
    assert lazy.truncated == 1  # example 1, counted once however often it is drawn
    lazy[2]
    assert lazy.truncated == 2


def test_tokenize_rejects_a_useless_max_length_or_a_tokenizer_without_eos():
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        tokenize_record(byte_tokenizer(), Record("a", "", "b"), max_length=0)
    tokenizer = byte_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize_record(tokenizer, Record("a", "", "b"), max_length=10)


def test_collate_pads_on_the_right():
    tokenizer = byte_tokenizer()
    examples, _ = tokenize_records(tokenizer, [Record("a", "", "b"), Record("aaaa", "", "bb")],
                                   max_length=512)
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    short, long = (len(example.input_ids) for example in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, long)
    assert batch["input_ids"][0].tolist() == examples[0].input_ids + [0] * (long - short)
    assert batch["labels"][0].tolist() == examples[0].labels + [IGNORE_INDEX] * (long - short)
    assert batch["attention_mask"].tolist() == [[1] * short + [0] * (long - short), [1] * long]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_token_id=0)


# --------------------------------------------------------------------------- MMLU

def mmlu_row(text="Qusetion: 2+2? Options: A. 3, B. 4, C. 5, D. 22", answer="The answer is: B. 4",
             subject="elementary_mathematics") -> dict:
    return {"instruction": "Please answer the following multiple-choice question honestly.",
            "input": text, "output": answer, "class": subject}


def load_mmlu_rows(tmp_path: Path, rows: list) -> list:
    return load_mmlu(write(tmp_path / "mmlu.json", rows))


def test_mmlu_prompt_ends_where_the_answer_letter_comes(tmp_path):
    [question] = load_mmlu_rows(tmp_path, [mmlu_row()])
    assert question.question == "2+2?"
    assert (question.choices, question.answer) == (("3", "4", "5", "22"), "B")
    assert mmlu_prompt(question) == (
        "The following is a multiple choice question about elementary mathematics.\n\n"
        "2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")


def test_mmlu_parsing_tolerates_spelling_and_spacing(tmp_path):
    [question] = load_mmlu_rows(tmp_path, [mmlu_row(
        " Question:  Which?\nReally? Options:A.x,B. y, z ,C.w,  D. v. ", "The answer is: D")])
    assert question.question == "Which?\nReally?"
    assert question.choices == ("x", "y, z", "w", "v.")
    assert question.answer == "D"


@pytest.mark.parametrize(("row", "message"), [
    (mmlu_row(text="2+2? A. 3, B. 4, C. 5, D. 22"), "record 1: field 'input' is not 'Qusetion:"),
    (mmlu_row(text="Qusetion: 2+2? Options: A. 3, B. 4, C. 5"), "record 1: field 'input' is not"),
    (mmlu_row(answer="B"), "record 1: field 'output' is not 'The answer is: <A-D>"),
    (mmlu_row(answer="The answer is: E. 4"), "record 1: field 'output' is not"),
    (mmlu_row(answer="The answer is: A. 4"),
     "record 1: field 'output' says A is '4' but option A of 'input' reads '3'"),
    ({k: v for k, v in mmlu_row().items() if k != "class"}, "record 1: field 'class' is missing"),
    (mmlu_row(subject=None), "record 1: field 'class' must be a string, got null"),
    ("question", "record 1: must be a JSON object, got str"),
])
def test_bad_mmlu_records_raise_with_their_index(tmp_path, row, message):
    with pytest.raises(DataError, match=f"^mmlu.json: {message}"):
        load_mmlu_rows(tmp_path, [mmlu_row(), row])


def test_mmlu_file_errors_and_limit(tmp_path):
    with pytest.raises(DataError, match="mmlu.json: contains no records"):
        load_mmlu_rows(tmp_path, [])
    with pytest.raises(DataError, match="missing.json: cannot be read"):
        load_mmlu(tmp_path / "missing.json")
    three = write(tmp_path / "three.json", [mmlu_row()] * 3)
    assert len(load_mmlu(three, limit=2)) == 2
    assert load_mmlu(three, limit=0) == []  # a run that scores no MMLU
    with pytest.raises(ValueError, match="limit must be at least 0"):
        load_mmlu(three, limit=-1)
