"""Chat data: conversation records (messages, ShareGPT), tokenisation in the tokenizer's own
chat template with loss on every assistant turn, turn-keeping truncation, prompt_format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.data import Conversation, DataError, load_clients, load_records

from support import write

CONVERSATIONS = [
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", "4"),
     ("user", "And 3+3?"), ("assistant", "6, since 3+3=6.")],
    [("user", "Name a colour."), ("assistant", "Red.")],
]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def messages_row(turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def sharegpt_row(turns) -> dict:
    return {"conversations": [{"from": SHAREGPT_ROLES[role], "value": content} for role, content in turns]}


@pytest.fixture
def chat_files(tmp_path) -> tuple[Path, Path]:
    """The same conversations as a messages .jsonl file and a ShareGPT .json file."""
    messages = write(tmp_path / "chats.jsonl", "\n".join(json.dumps(messages_row(turns)) for turns in CONVERSATIONS))
    sharegpt = write(tmp_path / "sharegpt.json", [sharegpt_row(turns) for turns in CONVERSATIONS])
    return messages, sharegpt


def test_messages_and_sharegpt_files_load_as_the_same_conversations(chat_files):
    records, sharegpt_records = (load_records(path) for path in chat_files)
    assert records == sharegpt_records
    assert [[(m.role, m.content) for m in record.messages] for record in records] == CONVERSATIONS


BAD_TURNS = [  # (file name, row, what the one-line error says)
    ("chats.json", {"messages": [{"role": "user", "content": "Hi"}, {"content": "Hello"}]},
     "chats.json: record 1: field 'messages[1].role' is missing"),
    ("chats.json", {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}]},
     "chats.json: record 1: field 'messages[1].role' is 'tool'; expected one of 'system', 'user', 'assistant'"),
    ("chats.json", {"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "x"}]},
     "chats.json: record 1: field 'messages[0].content' must be a string, got list"),
    ("chats.json", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
     "chats.json: record 1: field 'messages[1].content' must be a string, got null"),
    ("chats.json", {"messages": []}, "chats.json: record 1: field 'messages' is an empty conversation"),
    ("chats.json", {"messages": "Hi"}, "chats.json: record 1: field 'messages' must be a list of turns, got str"),
    ("chats.json", {"messages": ["Hi"]}, "chats.json: record 1: field 'messages[0]' must be an object, got str"),
    ("chats.json", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
     "chats.json: record 1: field 'messages' has no assistant turn to learn from"),
    ("chats.json", {"messages": [{"role": "assistant", "content": "Hello"}]},
     "chats.json: record 1: field 'messages[0]' is an assistant turn; a conversation opens with a system or user"),
    ("chats.json", {"messages": [], "conversations": []},
     "chats.json: record 1: field 'messages' and 'conversations' are both present; keep one"),
    ("share.jsonl", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]},
     "share.jsonl: line 2: field 'conversations[1].value' is missing"),
    ("share.jsonl", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]},
     "share.jsonl: line 2: field 'conversations[1].from' is 'bot'; expected one of 'system', 'human', 'user', "
     "'gpt', 'assistant'"),
    ("share.jsonl", {"conversations": [{"role": "user", "content": "Hi"}]},
     "share.jsonl: line 2: field 'conversations[0].from' is missing"),
]


@pytest.mark.parametrize(("name", "row", "message"), BAD_TURNS, ids=[message for _, _, message in BAD_TURNS])
def test_a_malformed_turn_is_a_one_line_error_naming_file_record_and_field(tmp_path, name, row, message):
    good = messages_row(CONVERSATIONS[1])
    path = tmp_path / name
    write(path, "\n".join(json.dumps(r) for r in (good, row)) if name.endswith(".jsonl") else [good, row])
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert caught.value.source == name and caught.value.where in ("record 1", "line 2")


def labelled_conversations(count: int, unlabelled: tuple[int, ...] = ()) -> list[dict]:
    rows = [{**messages_row([("user", f"Question {i}"), ("assistant", f"Answer {i}")]), "source": f"s{i % 3}"}
            for i in range(count)]
    for index in unlabelled:
        del rows[index]["source"]
    return rows


def test_dirichlet_splits_conversations_by_a_named_field(tmp_path):
    path = write(tmp_path / "chats.json", labelled_conversations(30))
    clients = load_clients(path, num_clients=3, alpha=1.0, min_size=2, seed=0, by="source")
    records = load_records(path)
    assert sorted(sum(clients.values(), []), key=records.index) == records
    assert all(isinstance(record, Conversation) for client in clients.values() for record in client)
    assert load_clients(path, num_clients=3, alpha=1.0, min_size=2, seed=0, by="source") == clients

    missing = write(tmp_path / "missing.json", labelled_conversations(30, unlabelled=(4, 7)))
    with pytest.raises(DataError, match=r"missing.json: 2 of 30 records have no 'source' \(the first: record 4\), "
                                        "which partition='dirichlet' needs"):
        load_clients(missing, num_clients=3, min_size=2, by="source")
    assert len(load_clients(missing, num_clients=3, min_size=2, partition="iid")) == 3
    nested = write(tmp_path / "nested.json", [{**row, "source": ["a"]} for row in labelled_conversations(30)])
    with pytest.raises(DataError, match="record 0: field 'source' must be a string or an integer to split"):
        load_clients(nested, num_clients=3, min_size=2, by="source")
