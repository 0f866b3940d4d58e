"""Chat data: conversation records (messages, ShareGPT), tokenisation in the tokenizer's own
chat template with loss on every assistant turn, turn-keeping truncation, prompt_format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.data import (
    IGNORE_INDEX,
    Conversation,
    DataError,
    LazyTokenizedRecords,
    Message,
    Record,
    load_clients,
    load_records,
    resolve_prompt_format,
    split_clients,
    tokenize_record,
    tokenize_records,
)
from fedlora.engine.config import ConfigError, build_config
from fedlora.engine.inputs import run_prompt_format
from fedlora.engine.setup import prepare_run
from fedlora.models import ModelError, load_model

from support import byte_tokenizer, tiny_config, write

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


# ---------------------------------------------------------------------- tokenisation

#: ChatML, each turn ended by the tokenizer's EOS (the end-of-turn token a chat model learns)
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml_tokenizer(make=byte_tokenizer):
    tokenizer = make()
    tokenizer.chat_template = CHATML
    return tokenizer


def as_messages(record) -> list[dict]:
    return [{"role": message.role, "content": message.content} for message in record.messages]


def plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def labelled_runs(tokenizer, example) -> list[str]:
    """The text of every run of consecutive labelled tokens."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [tokenizer.decode(tokens) for tokens in runs + ([run] if run else [])]


def check_files_tokenise_as_the_template(tokenizer, chat_files) -> list:
    """Both files give the same records and examples; the ids are apply_chat_template's and the
    labels exactly every assistant turn's content with its EOS. Returns the examples."""
    records, sharegpt_records = (load_records(path) for path in chat_files)
    examples, stats = tokenize_records(tokenizer, records, 4096, prompt_format="chat")
    assert tokenize_records(tokenizer, sharegpt_records, 4096, prompt_format="chat") == (examples, stats)
    assert (stats.truncated, stats.dropped_turns) == (0, 0)
    for record, example in zip(records, examples):
        assert example.input_ids == tokenizer.apply_chat_template(as_messages(record), tokenize=True)["input_ids"]
        assert labelled_runs(tokenizer, example) == [message.content + tokenizer.eos_token
                                                     for message in record.messages if message.role == "assistant"]
    return examples


def test_messages_and_sharegpt_files_tokenise_as_the_chat_template_with_every_assistant_turn_learned(chat_files):
    tokenizer = chatml_tokenizer()
    examples = check_files_tokenise_as_the_template(tokenizer, chat_files)
    # built here turn by turn (a byte tokenizer merges nothing): only assistant text and its EOS learned
    expected_ids, expected_labels = [], []
    for role, content in CONVERSATIONS[0]:
        header, newline = plain_ids(tokenizer, f"<|im_start|>{role}\n"), plain_ids(tokenizer, "\n")
        body = plain_ids(tokenizer, content) + [tokenizer.eos_token_id]
        expected_ids += header + body + newline
        expected_labels += ([IGNORE_INDEX] * len(header) + (body if role == "assistant" else [IGNORE_INDEX] * len(body))
                            + [IGNORE_INDEX] * len(newline))
    assert (examples[0].input_ids, examples[0].labels) == (expected_ids, expected_labels)


@pytest.mark.slow
def test_smollm2_tokenises_both_files_as_its_own_chat_template(chat_files, smollm2_cache):
    _, tokenizer = load_model("smollm2-135m", gguf_cache=smollm2_cache)
    examples = check_files_tokenise_as_the_template(tokenizer, chat_files)
    # its template adds a default system prompt to the second conversation: masked like any system turn
    assert tokenizer.decode(examples[1].input_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert resolve_prompt_format(None, tokenizer) == "chat"


def test_an_instruction_record_is_a_user_turn_and_an_assistant_turn():
    tokenizer = chatml_tokenizer()
    example = tokenize_record(tokenizer, Record("Add", "1 2", "3"), 512, prompt_format="chat")
    turns = [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert example.input_ids == tokenizer.apply_chat_template(turns, tokenize=True)["input_ids"]
    assert labelled_runs(tokenizer, example) == ["3</s>"]
    without_context = tokenize_record(tokenizer, Record("Say hi", "", "hi"), 512, prompt_format="chat")
    assert tokenizer.decode(without_context.input_ids).startswith("<|im_start|>user\nSay hi</s>")


def test_truncation_keeps_whole_turns_and_reports_the_dropped_ones():
    tokenizer = chatml_tokenizer()
    record = Conversation(tuple(Message(role, content) for role, content in CONVERSATIONS[0]))
    messages = as_messages(record)
    two_exchanges = tokenizer.apply_chat_template(messages[:5], tokenize=True)["input_ids"]
    full_length = len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert len(two_exchanges) < full_length
    for max_length in (len(two_exchanges), full_length - 1):
        example = tokenize_record(tokenizer, record, max_length, prompt_format="chat")
        assert example.input_ids == two_exchanges  # exactly the template's rendering of the first five turns
        assert labelled_runs(tokenizer, example) == ["Hello!</s>", "4</s>"]
        assert (example.truncated, example.dropped_turns) == (True, 2)

    untouched = Conversation(record.messages[:3])
    examples, stats = tokenize_records(tokenizer, [record, untouched], len(two_exchanges), prompt_format="chat")
    assert (stats.examples, stats.truncated, stats.prompt_truncated, stats.dropped_turns) == (2, 1, 0, 2)
    lazy = LazyTokenizedRecords(tokenizer, [record, untouched], len(two_exchanges), prompt_format="chat")
    assert [lazy[1], lazy[0], lazy[0]] == [examples[1], examples[0], examples[0]]
    assert (lazy.truncated, lazy.dropped_turns) == (1, 2)


def test_a_first_exchange_too_long_is_cut_inside_as_an_alpaca_prompt_is():
    tokenizer = chatml_tokenizer()
    record = Conversation((Message("system", "s" * 300), Message("user", "Hi"), Message("assistant", "a" * 300),
                           Message("user", "More"), Message("assistant", "b")))
    example = tokenize_record(tokenizer, record, 100, prompt_format="chat")
    text = tokenizer.decode(example.input_ids)
    assert len(example.input_ids) == 100 and (example.truncated, example.dropped_turns) == (True, 2)
    assert text.startswith("<|im_start|>system\nsss")  # the prompt keeps its start ...
    assert text[:75].endswith("<|im_start|>assistant\n")  # ... and the template's assistant header
    assert labelled_runs(tokenizer, example) == ["a" * 25]  # a quarter of max_length for the response
    _, stats = tokenize_records(tokenizer, [record], 100, prompt_format="chat")
    assert (stats.truncated, stats.prompt_truncated, stats.dropped_turns) == (1, 1, 2)


def test_prompt_format_auto_is_chat_for_a_tokenizer_with_a_template_and_alpaca_otherwise():
    with_template, without = chatml_tokenizer(), byte_tokenizer()
    assert resolve_prompt_format(None, with_template) == "chat"
    assert resolve_prompt_format(None, without) == "alpaca"
    assert resolve_prompt_format("alpaca", with_template) == "alpaca"
    said = []
    assert run_prompt_format(build_config({}), with_template, said.append) == "chat"
    assert run_prompt_format(build_config({"prompt_format": "alpaca"}), with_template, said.append) == "alpaca"
    assert run_prompt_format(build_config({}), without, said.append) == "alpaca"
    assert said == ["prompt format: chat (auto: the tokenizer has a chat template)",
                    "prompt format: alpaca (as configured)",
                    "prompt format: alpaca (auto: the tokenizer has no chat template)"]
    with pytest.raises(ConfigError, match="'prompt_format' must be one of 'alpaca', 'chat', got 'sharegpt'"):
        build_config({"prompt_format": "sharegpt"})


def test_each_format_refuses_what_it_cannot_render():
    conversation = Conversation((Message("user", "Hi"), Message("assistant", "Hello")))
    with pytest.raises(DataError, match="prompt_format 'alpaca': cannot render the 1 conversation records"):
        LazyTokenizedRecords(chatml_tokenizer(), [Record("a", "", "b"), conversation], 64, prompt_format="alpaca")
    with pytest.raises(ModelError, match="has no chat template for prompt_format 'chat'"):
        tokenize_records(byte_tokenizer(), [conversation], 64, prompt_format="chat")


def test_a_run_tokenises_training_and_held_out_conversations_in_the_chat_template(tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    for client in range(2):
        write(folder / f"local_training_{client}.json",
              [messages_row([("user", f"Q{i} of {client}"), ("assistant", f"A{i}")]) for i in range(6)])
    write(folder / "global_test.json", [messages_row(CONVERSATIONS[0])])
    model, tokenizer = load_model("tiny-llama", seed=0)
    tokenizer.chat_template = CHATML
    config = tiny_config(folder, tmp_path / "run", ranks=[2], validation_fraction=0.2)
    said, evaluators = [], []
    setup = prepare_run(config, tmp_path / "run", log=said.append, loaded=(model, tokenizer),
                        evaluation=lambda evaluator, _: evaluators.append(evaluator) or evaluator)
    assert "prompt format: chat (auto: the tokenizer has a chat template)" in said
    assert "1 of 1 test records truncated to max_length 48, 4 whole turns dropped" in said
    training, validation = split_clients(load_clients(folder), config.validation_fraction, config.seed)
    for client, records in training.items():
        examples = setup.client_examples[client]
        assert list(examples) == tokenize_records(tokenizer, records, 48, prompt_format="chat")[0]
    (evaluator,) = evaluators
    assert list(evaluator.validation_examples) == tokenize_records(tokenizer, validation, 48, prompt_format="chat")[0]
    assert labelled_runs(tokenizer, evaluator.test_examples[0]) == ["Hello!<eos>"]


@pytest.mark.slow
def test_a_smollm2_run_in_its_chat_format_lowers_its_held_out_loss(smollm2_cache, tmp_path):
    from support import DOLLY, require_shared_data, run_tiny

    require_shared_data()
    rows = run_tiny(DOLLY, tmp_path / "chat", model="smollm2-135m", rounds=2, clients=2, local_steps=3,
                    batch_size=4, ranks=[8], max_length=64, test_limit=8, lr=3e-3, generation_limit=0,
                    validation_fraction=0.001)
    config = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert config["prompt_format"] is None  # the default: chat, for a model with a template
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.01
