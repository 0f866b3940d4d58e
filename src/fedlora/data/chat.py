"""Records as the model's own chat template renders them, with loss on every assistant turn.

The token ids are exactly the tokenizer's ``apply_chat_template(messages, tokenize=True)``.
Which of them an assistant wrote is found by rendering prefixes of the conversation with the
same template, which works for any template: an assistant turn's labels start where
``messages[:i]`` rendered with the generation prompt (the template's own assistant header)
ends, and stop after the end-of-turn EOS within what ``messages[:i + 1]`` adds (or at its end
when the template puts no EOS there). Character positions become tokens through the offsets
of the one tokenisation, so tokens never need to split where the turns do.

An instruction record is the conversation [user: instruction (and its context), assistant:
response]. A conversation longer than max_length keeps its turns up to the last assistant turn
that fits whole; when even the first exchange does not fit, it is cut inside as an Alpaca
prompt is (:func:`~fedlora.data.examples.exchange_example`) and the turns after it are dropped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, replace

from jinja2 import TemplateError

from fedlora.data.examples import IGNORE_INDEX, TokenizedExample, exchange_example
from fedlora.data.records import AnyRecord, Conversation, DataError
from fedlora.models import ModelError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_messages(record: AnyRecord) -> list[dict[str, str]]:
    """The record as the ``messages`` list ``apply_chat_template`` takes."""
    if isinstance(record, Conversation):
        return [{"role": message.role, "content": message.content} for message in record.messages]
    prompt = f"{record.instruction}\n\n{record.input}" if record.input.strip() else record.instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record.output}]


@dataclass(frozen=True)
class _AssistantTurn:
    """Token positions of one assistant turn in the rendered conversation."""

    #: the turn's index in the conversation
    message: int
    #: where the template's assistant header starts (everything before is the turns before)
    header: int
    #: the labelled tokens: [start, end)
    start: int
    end: int
    #: after everything the template renders for the turn
    turn_end: int


class ChatEncoder:
    """Records tokenised in the tokenizer's chat template, labelled on the assistant turns."""

    def __init__(self, tokenizer, max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if not has_chat_template(tokenizer):
            raise ModelError(f"tokenizer {type(tokenizer).__name__} has no chat template for "
                             "prompt_format 'chat' (use prompt_format 'alpaca')")
        if not tokenizer.is_fast:  # the offsets that place turns on tokens need a fast tokenizer
            raise ModelError(f"prompt_format 'chat' needs a fast tokenizer; {type(tokenizer).__name__} is not")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, record: AnyRecord) -> tuple[TokenizedExample, bool]:
        """The example, and whether the prompt of its first exchange was cut."""
        messages = chat_messages(record)
        try:
            ids, turns = self._assistant_turns(messages)
        except TemplateError as error:  # e.g. a template that insists on alternating roles
            roles = ", ".join(message["role"] for message in messages)
            raise DataError("chat template", f"cannot render a conversation of roles {roles}: {error}") from error
        if len(ids) <= self.max_length:
            return TokenizedExample(ids, _labels(ids, turns), truncated=False), False
        fitting = [turn for turn in turns if turn.turn_end <= self.max_length]
        if fitting:  # whole turns up to the last assistant turn that fits
            last = fitting[-1]
            kept = ids[:last.turn_end]
            return TokenizedExample(kept, _labels(kept, fitting), truncated=True,
                                    dropped_turns=len(messages) - last.message - 1), False
        first = turns[0]
        example, prompt_cut = exchange_example(ids[:first.header], ids[first.header:first.start],
                                               ids[first.start:first.end], self.max_length)
        return replace(example, truncated=True, dropped_turns=len(messages) - first.message - 1), prompt_cut

    def _assistant_turns(self, messages: list[dict[str, str]]) -> tuple[list[int], list[_AssistantTurn]]:
        """The conversation's token ids and where each assistant turn lies in them."""
        encoding = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                      tokenizer_kwargs={"return_offsets_mapping": True})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        starts = [start for start, _ in encoding["offset_mapping"]]

        def token_at(char: int) -> int:
            """The first token that starts at or after character ``char``."""
            return bisect_left(starts, char)

        eos = self.tokenizer.eos_token
        turns = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            header = self._rendered_length(text, messages[:index], generation_prompt=False)
            start = self._rendered_length(text, messages[:index], generation_prompt=True)
            turn_end = self._rendered_length(text, messages[:index + 1], generation_prompt=False)
            eos_at = text.rfind(eos, start, turn_end) if eos else -1
            end = eos_at + len(eos) if eos_at >= 0 else turn_end
            turns.append(_AssistantTurn(index, token_at(header), token_at(start), token_at(end), token_at(turn_end)))
        return list(encoding["input_ids"]), turns

    def _rendered_length(self, text: str, prefix: list[dict[str, str]], *, generation_prompt: bool) -> int:
        """How much of the whole conversation's ``text`` its first turns render to."""
        rendered = self.tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)
        if not text.startswith(rendered):
            raise ModelError(f"the chat template of {type(self.tokenizer).__name__} renders the first "
                             f"{len(prefix)} turns differently when more follow, so its assistant turns cannot "
                             "be located (use prompt_format 'alpaca')")
        return len(rendered)


def _labels(ids: list[int], turns: list[_AssistantTurn]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for turn in turns:
        labels[turn.start:turn.end] = ids[turn.start:turn.end]
    return labels
